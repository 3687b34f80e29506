"""Issue #18's acceptance on the served SmolLM2 (`tokenmill serve`, embedded model): for ten JSON schemas,
every greedy and every sampled answer through TGI's `grammar`, OpenAI's `response_format` and vLLM's
`structured_outputs` parses and validates; regexes fullmatch; and with 16 concurrent requests, half of
them constrained, the unconstrained half's greedy answers are what they are alone."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

pytestmark = pytest.mark.slow

_NAME = {"type": "string", "minLength": 1, "maxLength": 20}
SCHEMAS = [
    ("a person", {"type": "object", "required": ["name", "age"], "additionalProperties": False,
                  "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}}),
    ("the weather", {"type": "object", "required": ["sky", "warm"], "additionalProperties": False,
                     "properties": {"sky": {"enum": ["sunny", "cloudy", "rainy"]}, "warm": {"type": "boolean"}}}),
    ("three colours", {"type": "object", "required": ["colours"], "additionalProperties": False,
                       "properties": {"colours": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                                  "minItems": 1, "maxItems": 3}}}),
    ("a product", {"type": "object", "required": ["code", "price"], "additionalProperties": False,
                   "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                  "price": {"type": "integer", "minimum": 1, "maximum": 999}}}),
    ("an address", {"type": "object", "required": ["street", "city"], "additionalProperties": False,
                    "properties": {"street": _NAME, "city": {"type": "object", "required": ["name", "zip"],
                                                              "additionalProperties": False,
                                                              "properties": {"name": _NAME, "zip": {
                                                                  "type": "string", "pattern": "^[0-9]{5}$"}}}}}),
    ("a book", {"type": "object", "required": ["title", "year", "genre"], "additionalProperties": False,
                "properties": {"title": {"type": "string", "maxLength": 30},
                               "year": {"type": "integer", "minimum": 1500, "maximum": 2025},
                               "genre": {"enum": ["novel", "poetry", "science"]}}}),
    ("a yes or no answer", {"type": "object", "required": ["answer"], "additionalProperties": False,
                            "properties": {"answer": {"enum": ["yes", "no"]}}}),
    ("a team", {"type": "object", "required": ["members"], "additionalProperties": False,
                "properties": {"members": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                    "type": "object", "required": ["name", "role"], "additionalProperties": False,
                    "properties": {"name": _NAME, "role": {"enum": ["lead", "dev"]}}}}}}),
    ("a temperature", {"type": "object", "required": ["celsius"], "additionalProperties": False,
                       "properties": {"celsius": {"type": "integer", "minimum": -50, "maximum": 50}}}),
    ("a date", {"type": "object", "required": ["date"], "additionalProperties": False,
                "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}}),
]
SAMPLINGS = [{"temperature": 0}, {"temperature": 0.9, "seed": 4}]
MAX_TOKENS = 160


def _question(topic: str) -> str:
    return f"Describe {topic} as JSON."


def _tgi(topic, schema, sampling) -> tuple[str, dict]:
    parameters = {"grammar": {"type": "json", "value": schema}, "max_new_tokens": MAX_TOKENS}
    if sampling["temperature"]:
        parameters.update(do_sample=True, temperature=sampling["temperature"], seed=sampling["seed"])
    return "/generate", {"inputs": _question(topic), "parameters": parameters}


def _openai(topic, schema, sampling) -> tuple[str, dict]:
    return "/v1/chat/completions", {
        "messages": [{"role": "user", "content": _question(topic)}], "max_tokens": MAX_TOKENS, **sampling,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}}


def _vllm(topic, schema, sampling) -> tuple[str, dict]:
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": _question(topic)}],
                                    "max_tokens": MAX_TOKENS, **sampling, "structured_outputs": {"json": schema}}


def _text(route: str, answer: dict) -> str:
    return answer["generated_text"] if route == "/generate" else answer["choices"][0]["message"]["content"]


async def _post_all(url: str, requests: list[tuple[str, dict]]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        responses = await asyncio.gather(*(client.post(route, json=body) for route, body in requests))
    for response in responses:
        assert response.status_code == 200, response.text
    return [r.json() for r in responses]


@pytest.mark.parametrize("api", [_tgi, _openai, _vllm], ids=["grammar", "response_format", "structured_outputs"])
def test_every_answer_validates_against_its_schema(served_smollm2, api) -> None:
    cases = [(schema, api(topic, schema, sampling)) for topic, schema in SCHEMAS for sampling in SAMPLINGS]
    answers = asyncio.run(_post_all(served_smollm2, [request for _, request in cases]))
    for (schema, (route, _)), answer in zip(cases, answers):
        jsonschema.validate(json.loads(_text(route, answer)), schema)


def test_regex_grammars_fullmatch(served_smollm2) -> None:
    patterns = [r"\(\d{3}\) \d{3}-\d{4}", r"[A-Z][a-z]{2,8}", r"(yes|no), because [a-z ]{5,30}\."]
    requests = [("/generate", {"inputs": f"Answer: {i}", "parameters": {
        "grammar": {"type": "regex", "value": p}, "max_new_tokens": 60, **sampling}})
        for i, p in enumerate(patterns) for sampling in ({}, {"do_sample": True, "seed": 3})]
    answers = asyncio.run(_post_all(served_smollm2, requests))
    for (_, body), answer in zip(requests, answers):
        assert re.fullmatch(body["parameters"]["grammar"]["value"], answer["generated_text"]), answer


def test_half_constrained_batch_leaves_the_free_half_unchanged(served_smollm2) -> None:
    free = [("/generate", {"inputs": f"Tell me a fact about the number {i}.",
                           "parameters": {"max_new_tokens": 32, "details": True}}) for i in range(8)]
    constrained = [_tgi(topic, schema, SAMPLINGS[i % 2]) for i, (topic, schema) in enumerate(SCHEMAS[:8])]
    alone = asyncio.run(_post_all(served_smollm2, free))
    mixed = asyncio.run(_post_all(served_smollm2, free + constrained))
    tokens = [[t["id"] for t in a["details"]["tokens"]] for a in alone]
    assert [[t["id"] for t in a["details"]["tokens"]] for a in mixed[:8]] == tokens
