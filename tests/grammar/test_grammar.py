"""The grammar module: compilation off the caller's thread, cached by text, clear errors; matchers and
the batch bitmask; the reference mask kernel against a plain per-token loop."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("xgrammar")

from tests.tiny_models import VOCAB, char_tokenizer  # noqa: E402
from tokenmill.grammar import GrammarCompiler, GrammarError, GrammarSpec  # noqa: E402
from tokenmill.grammar.matcher import GrammarMatcher, fill_bitmask  # noqa: E402
from tokenmill.interfaces import TokenMask  # noqa: E402

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["ab", "ba"]}},
          "required": ["ok", "tag"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def compiler(tokenizer):
    compiler = GrammarCompiler.for_tokenizer(tokenizer, VOCAB, [tokenizer.eos_token_id])
    yield compiler
    compiler.shutdown()


def _allowed(bitmask: torch.Tensor, row: int) -> set[int]:
    return {t for t in range(VOCAB) if (int(bitmask[row, t // 32]) >> (t % 32)) & 1}


def _walk(compiler, tokenizer, spec: GrammarSpec, text: str) -> GrammarMatcher:
    """A matcher fed `text` one character token at a time, checking each is allowed first."""
    matcher = GrammarMatcher(compiler.compile(spec))
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        assert token in _allowed(fill_bitmask([matcher], VOCAB), 0)
        assert matcher.accept(token)
    return matcher


def test_the_same_grammar_text_compiles_once_and_is_shared(compiler) -> None:
    spec = GrammarSpec.json_schema(SCHEMA)
    assert compiler.submit(spec) is compiler.submit(GrammarSpec.json_schema(json.dumps(SCHEMA)))
    assert compiler.submit(spec) is not compiler.submit(GrammarSpec("regex", "ab+"))


def test_properties_come_in_the_order_the_schema_declares(compiler, tokenizer) -> None:
    declared = {**SCHEMA, "properties": {"tag": SCHEMA["properties"]["tag"], "ok": SCHEMA["properties"]["ok"]}}
    _walk(compiler, tokenizer, GrammarSpec.json_schema(declared), '{"tag": "ab", "ok": true}')
    matcher = _walk(compiler, tokenizer, GrammarSpec.json_schema(declared), '{"')
    assert tokenizer.convert_tokens_to_ids("o") not in _allowed(fill_bitmask([matcher], VOCAB), 0)


@pytest.mark.parametrize("spec, message", [
    (GrammarSpec("regex", "(ab"), "parenthesis is not closed"),
    (GrammarSpec("ebnf", "root ::= missing"), 'Rule "missing" is not defined'),
    (GrammarSpec("json", '{"type": "objekt"}'), "objekt"),
])
def test_a_grammar_that_cannot_compile_raises_the_compilers_reason(compiler, spec, message) -> None:
    with pytest.raises(GrammarError, match=re.escape(message)) as raised:
        compiler.compile(spec)
    assert raised.value.args[0].startswith(f"the {spec.kind} grammar could not be compiled: ")


def test_a_schema_that_is_not_json_is_refused_before_compiling() -> None:
    with pytest.raises(GrammarError, match="not valid JSON"):
        GrammarSpec.json_schema("{nope")


def test_eos_is_allowed_only_where_the_grammar_accepts(compiler, tokenizer) -> None:
    eos = tokenizer.eos_token_id
    matcher = _walk(compiler, tokenizer, GrammarSpec.json_schema(SCHEMA), '{"ok": true, "tag": "a')
    assert eos not in _allowed(fill_bitmask([matcher], VOCAB), 0)
    for token in tokenizer('b"}', add_special_tokens=False).input_ids:
        assert matcher.accept(token)
    assert _allowed(fill_bitmask([matcher], VOCAB), 0) == {eos}  # the object is closed: only the end is left
    assert matcher.accept(eos) and matcher.terminated


def test_choice_and_regex_accept_exactly_their_language(compiler, tokenizer) -> None:
    choice = GrammarSpec.choice(["yes", "no way"])
    assert _walk(compiler, tokenizer, choice, "no way").accept(tokenizer.eos_token_id)
    matcher = GrammarMatcher(compiler.compile(choice))
    assert not matcher.accept(tokenizer.convert_tokens_to_ids("x"))
    regex = _walk(compiler, tokenizer, GrammarSpec("regex", r"\d{2}-[ab]+"), "42-ab")
    assert tokenizer.eos_token_id in _allowed(fill_bitmask([regex], VOCAB), 0)


def test_the_batch_bitmask_leaves_unconstrained_rows_whole(compiler, tokenizer) -> None:
    assert fill_bitmask([None, None], VOCAB) is None
    matcher = GrammarMatcher(compiler.compile(GrammarSpec("regex", "[ab]+")))
    bitmask = fill_bitmask([None, matcher, None], VOCAB)
    assert bitmask.shape == (3, VOCAB // 32) and bitmask.dtype == torch.int32
    assert _allowed(bitmask, 0) == _allowed(bitmask, 2) == set(range(VOCAB))
    assert _allowed(bitmask, 1) == set(tokenizer.convert_tokens_to_ids(["a", "b", "ab", "ba"]))


@pytest.mark.parametrize("vocab", [256, 250, 49152])
def test_the_reference_mask_matches_a_per_token_loop(vocab) -> None:
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=generator)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (5, words), dtype=torch.int32, generator=generator)
    bitmask[2] = -1  # an unconstrained row
    masked = TokenMask().apply(logits.clone(), bitmask)
    for row, token in [(r, t) for r in range(5) for t in torch.randint(0, vocab, (64,), generator=generator).tolist()]:
        allowed = (int(bitmask[row, token // 32]) >> (token % 32)) & 1
        assert masked[row, token] == (logits[row, token] if allowed else float("-inf"))
    assert torch.equal(masked[2], logits[2])


@pytest.mark.parametrize("vocab", [256, 250, 49152])
def test_the_cpu_plugins_kernel_equals_the_reference(vocab) -> None:
    from tokenmill.plugins.cpu import token_mask

    if token_mask._token_mask is None:
        pytest.skip("the CPU extension is not built")
    generator = torch.Generator().manual_seed(vocab + 1)
    logits = torch.randn(7, vocab, generator=generator)
    bitmask = torch.randint(-2**31, 2**31 - 1, (7, (vocab + 31) // 32), dtype=torch.int32, generator=generator)
    bitmask[[1, 4]] = -1
    bitmask[5] = 0  # nothing allowed: the whole row at -inf
    expected = TokenMask().apply(logits, bitmask)
    assert torch.equal(token_mask.CTokenMask().apply(logits.clone(), bitmask), expected)
    rows = logits[[0, 3, 6]]  # a gathered copy, as the engine samples from when prompts are chunked
    assert torch.equal(token_mask.CTokenMask().apply(rows, bitmask[[0, 3, 6]]), expected[[0, 3, 6]])
