"""Streaming text: deltas never split a character, stop strings are found across token boundaries."""

from __future__ import annotations

import pytest

from tokenmill.detokenizer import IncrementalDetokenizer, StopChecker, TokenDecoder
from tokenmill.loader import load_checkpoint

TEXTS = ["Plain ASCII text, with punctuation!", "Accents: café, naïve, déjà vu.", "CJK: 日本語のテキストです。",
         "Emoji: 🎉🚀 and 👩‍👩‍👧 family", "Mixed: x² + y² = z², ∑ ∫ ≠ ≤"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_checkpoint(progress=False).tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_add_up_to_the_full_decode(tokenizer, text) -> None:
    prompt = tokenizer("Say:", add_special_tokens=False).input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.slow
def test_the_decoder_gives_the_tokenizers_own_text_for_every_token_and_window(tokenizer) -> None:
    decoder = TokenDecoder(tokenizer)
    assert decoder._backend is not None  # the fast path is what is under test
    specials = set(tokenizer.all_special_ids)
    assert decoder.special_ids == specials
    vocab = len(tokenizer)
    for token in list(range(0, vocab, 7)) + sorted(specials):
        assert decoder.token_text(token) == tokenizer.decode([token])
    ids = tokenizer("".join(TEXTS), add_special_tokens=False).input_ids + sorted(specials)
    for start in range(0, len(ids) - 6, 3):
        window = ids[start : start + 6]
        for skip in (True, False):
            assert decoder.decode(window, skip) == tokenizer.decode(window, skip_special_tokens=skip,
                                                                    clean_up_tokenization_spaces=False)


class _CleaningTokenizer:
    """A tokenizer whose decode cleans up spaces: the decoder must leave single tokens to it."""

    is_fast, clean_up_tokenization_spaces, all_special_ids = True, True, [0]

    def __init__(self, backend):
        self._tokenizer = backend

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        return "cleaned:" + self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.slow
def test_a_tokenizer_that_cleans_up_spaces_decodes_single_tokens_itself(tokenizer) -> None:
    decoder = TokenDecoder(_CleaningTokenizer(tokenizer._tokenizer))
    assert decoder.token_text(42) == "cleaned:" + tokenizer.decode([42])
    assert decoder.decode([42, 43], True) == tokenizer.decode([42, 43], clean_up_tokenization_spaces=False)


def test_stop_string_split_across_deltas_is_found_and_kept_for_tgi() -> None:
    checker = StopChecker(["STOP"], include_stop=True)
    emitted = [checker.add(d) for d in ["hello S", "TO", "P and more"]]
    assert emitted[0] == ("hello ", False)  # "S" could start "STOP": held back
    assert emitted[1] == ("", False)
    assert emitted[2] == ("STOP", True)
    assert checker.text == "hello STOP"


def test_stop_string_is_dropped_for_openai() -> None:
    checker = StopChecker(["\n\n", "END"], include_stop=False)
    out = "".join(text for text, _ in (checker.add(d) for d in ["a\n", "b E", "N", "Dz"]))
    assert out == "a\nb " and checker.text == "a\nb "


def test_held_back_text_is_flushed_when_generation_ends() -> None:
    checker = StopChecker(["STOP"], include_stop=True)
    assert checker.add("ends with ST") == ("ends with ", False)
    assert checker.flush() == "ST"


def test_the_stop_that_ends_first_wins_however_the_text_is_chunked() -> None:
    whole = StopChecker(["abcd", "bc"], include_stop=True)
    whole.add("xabcdy")
    piecewise = StopChecker(["abcd", "bc"], include_stop=True)
    for char in "xabcdy":
        piecewise.add(char)
    assert whole.text == piecewise.text == "xabc"


def test_unchecked_text_is_not_searched_for_stops_but_a_later_check_finds_one_ending_in_its_delta() -> None:
    checker = StopChecker(["END"], include_stop=False)
    assert checker.add("an END", check=False) == ("an END", False)  # short of min_tokens: no stop yet
    assert checker.add(" and EN", check=False) == (" and ", False)  # what might start a stop is held back
    assert checker.add("D!") == ("", True)  # the stop that began before the check is found
    assert checker.text == "an END and "
