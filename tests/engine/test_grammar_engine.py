"""Structured output through the engine on a tiny random model with a character-level tokenizer: every
constrained answer matches its grammar, greedy and sampled, in a batch shared with unconstrained
requests whose greedy tokens are what they are without the constrained ones."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from tests.tiny_models import build_tiny, char_tokenizer  # noqa: E402
from tokenmill.engine import Engine, EngineConfig  # noqa: E402
from tokenmill.grammar import GrammarError, GrammarSpec  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "tag", "n"],
          "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["ab", "ba", "yes"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
REGEX = r"[ab]{2,4}-\d\d"


@pytest.fixture(scope="module")
def engine():
    checkpoint = build_tiny("llama").checkpoint()
    checkpoint.tokenizer = char_tokenizer()
    engine = Engine(EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=8 << 20, progress=False),
                    checkpoint=checkpoint)
    yield engine
    engine.grammars.shutdown()


def _prompt(engine, text: str) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False).input_ids


def _tokens(outputs) -> list[int]:
    return [t.id for out in outputs for t in out.new_tokens]


def _constrained(seed: int | None) -> list[SamplingParams]:
    sampled = dict(temperature=1.3, seed=seed) if seed is not None else {}
    return [SamplingParams(max_new_tokens=60, grammar=GrammarSpec.json_schema(SCHEMA), **sampled),
            SamplingParams(max_new_tokens=20, grammar=GrammarSpec("regex", REGEX), **sampled),
            SamplingParams(max_new_tokens=10, grammar=GrammarSpec.choice(["yes", "no", "maybe"]), **sampled)]


def _check(outputs, spec_kind: str) -> None:
    final = outputs[-1]
    assert final.finished and final.finish_reason == "eos_token", final
    text = final.generated_text
    if spec_kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif spec_kind == "regex":
        assert re.fullmatch(REGEX, text), text
    else:
        assert text in ("yes", "no", "maybe")


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_every_constrained_answer_matches_and_the_unconstrained_ones_are_unchanged(engine, seed) -> None:
    prompts = [_prompt(engine, p) for p in ("Give me JSON: ", "tag? ", "yes or no? ", "hello there", "abc")]
    free = [SamplingParams(max_new_tokens=12, ignore_eos=True)] * 2
    alone = [_tokens(o) for o in engine.generate(prompts[3:], free)]
    results = engine.generate(prompts, _constrained(seed) + free)
    for outputs, kind in zip(results, ("json", "regex", "choice")):
        _check(outputs, kind)
    assert [_tokens(o) for o in results[3:]] == alone


def test_sixteen_mixed_requests_share_steps(engine) -> None:
    prompts = [_prompt(engine, f"request {i}: ") for i in range(16)]
    params = [p for seed in range(4) for p in _constrained(seed)[:2]] + [SamplingParams(max_new_tokens=8)] * 8
    alone = [_tokens(o) for o in engine.generate(prompts[8:], params[8:])]
    results = engine.generate(prompts, params)
    for outputs, kind in zip(results[:8], ["json", "regex"] * 4):
        _check(outputs, kind)
    assert [_tokens(o) for o in results[8:]] == alone
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_a_grammar_that_cannot_compile_fails_its_request_alone(engine) -> None:
    bad = SamplingParams(max_new_tokens=4, grammar=GrammarSpec("regex", "(unclosed"))
    with pytest.raises(GrammarError, match="could not be compiled: .*parenthesis"):
        engine.grammars.compile(bad.grammar)
    with pytest.raises(GrammarError, match="could not be compiled"):
        engine.add_request("bad", _prompt(engine, "x"), bad)  # compiled above, so known at once
    assert not engine.has_unfinished()
    good = engine.generate([_prompt(engine, "y")], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(_tokens(good[0])) == 4


def test_a_request_waits_for_its_grammar_without_holding_up_others(engine) -> None:
    pattern = r"(yes|no)\d"  # new text: most likely still compiling when added (either way it must work)
    spec = GrammarSpec("regex", pattern)
    engine.add_request("slow", _prompt(engine, "z"), SamplingParams(max_new_tokens=6, grammar=spec))
    engine.add_request("bad-later", _prompt(engine, "z"),
                       SamplingParams(max_new_tokens=6, grammar=GrammarSpec("ebnf", "root ::= nothing_here")))
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert re.fullmatch(pattern, finished["slow"].generated_text)
    assert finished["bad-later"].error and "could not be compiled" in finished["bad-later"].error


def test_min_tokens_does_not_hold_back_the_end_of_a_grammar(engine) -> None:
    params = SamplingParams(max_new_tokens=10, min_tokens=8, grammar=GrammarSpec.choice(["yes", "no"]))
    outputs = engine.generate([_prompt(engine, "?")], params)[0]
    assert outputs[-1].finish_reason == "eos_token" and outputs[-1].generated_text in ("yes", "no")
