"""Streaming text: deltas never split a character, stop strings are found across token boundaries."""

from __future__ import annotations

import pytest

from tokenmill.detokenizer import IncrementalDetokenizer, StopChecker
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
