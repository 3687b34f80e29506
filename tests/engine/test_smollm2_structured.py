"""Structured output on the embedded SmolLM2-135M-Instruct: every greedy and sampled answer to a set of
JSON schemas parses and validates, regexes fullmatch, and unconstrained requests in the same batch keep
their greedy tokens."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from tokenmill.engine import Engine, EngineConfig  # noqa: E402
from tokenmill.grammar import GrammarSpec  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow

SCHEMAS = {
    "Describe a person as JSON.": {
        "type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
        "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 120},
                       "city": {"type": "string", "maxLength": 30}}},
    "Rate the weather today as JSON.": {
        "type": "object", "additionalProperties": False, "required": ["sky", "warm"],
        "properties": {"sky": {"enum": ["sunny", "cloudy", "rainy"]}, "warm": {"type": "boolean"}}},
    "List some colours as JSON.": {
        "type": "object", "additionalProperties": False, "required": ["colours"],
        "properties": {"colours": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                   "minItems": 1, "maxItems": 3}}},
    "Give a product code as JSON.": {
        "type": "object", "additionalProperties": False, "required": ["code", "price"],
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                       "price": {"type": "number", "minimum": 0, "maximum": 1000}}},
}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine(EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=128 << 20, progress=False,
                                 max_num_batched_tokens=256))
    yield engine
    engine.grammars.shutdown()


def _prompt(engine, question: str) -> list[int]:
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def test_json_answers_validate_greedy_and_sampled_beside_unconstrained_requests(engine) -> None:
    prompts, params, schemas = [], [], []
    for question, schema in SCHEMAS.items():
        for sampling in ({}, {"temperature": 1.0, "seed": 11}):
            prompts.append(_prompt(engine, question))
            params.append(SamplingParams(max_new_tokens=120, grammar=GrammarSpec.json_schema(schema), **sampling))
            schemas.append(schema)
    prompts.append(_prompt(engine, "Call me at my phone number."))
    params.append(SamplingParams(max_new_tokens=30, grammar=GrammarSpec("regex", PHONE), temperature=0.8, seed=5))
    free_prompts = [_prompt(engine, "What is the capital of France?"), _prompt(engine, "Name a fruit.")]
    free = [SamplingParams(max_new_tokens=24)] * 2
    alone = [[t.id for o in outs for t in o.new_tokens] for outs in engine.generate(free_prompts, free)]
    results = engine.generate(prompts + free_prompts, params + free)
    for outputs, schema in zip(results, schemas):
        assert outputs[-1].finish_reason == "eos_token", outputs[-1].generated_text
        jsonschema.validate(json.loads(outputs[-1].generated_text), schema)
    assert re.fullmatch(PHONE, results[len(schemas)][-1].generated_text)
    assert [[t.id for o in outs for t in o.new_tokens] for outs in results[-2:]] == alone
