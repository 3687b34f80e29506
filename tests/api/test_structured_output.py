"""Structured output through the HTTP APIs (issue #18): TGI's `grammar`, OpenAI's `response_format`, vLLM's
`structured_outputs` and `guided_*`, on a tiny random model with a character-level tokenizer; every answer
matches its constraint. `--disable-grammar-support` refuses them with TGI's words."""

from __future__ import annotations

import json
import re

import httpx
import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from tests.api.conftest import TinyServer  # noqa: E402
from tests.tiny_models import char_tokenizer  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok"],
          "properties": {"name": {"enum": ["ab", "ba"]}, "ok": {"type": "boolean"}}}
REGEX = r"\d{3}-[ab]{2}"


@pytest.fixture(scope="module")
def server():
    server = TinyServer(tokenizer=char_tokenizer(), max_concurrent_requests=8)
    yield server
    server.stop()


def _post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, timeout=120)


def _ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 1.5, "seed": 7}])
@pytest.mark.parametrize("grammar", [{"type": "json", "value": SCHEMA}, {"type": "json", "value": json.dumps(SCHEMA)},
                                     {"type": "json_schema", "value": {"name": "x", "schema": SCHEMA}}])
def test_generate_with_a_json_grammar_validates(server, grammar, sampling) -> None:
    body = {"inputs": "JSON please: ", "parameters": {"grammar": grammar, "max_new_tokens": 60, "details": True,
                                                       **sampling}}
    answer = _ok(_post(server, "/generate", body))
    jsonschema.validate(json.loads(answer["generated_text"]), SCHEMA)
    assert answer["details"]["finish_reason"] == "eos_token"


def test_generate_stream_with_a_regex_grammar_fullmatches(server) -> None:
    body = {"inputs": "code: ", "parameters": {"grammar": {"type": "regex", "value": REGEX}, "max_new_tokens": 20}}
    response = _post(server, "/generate_stream", body)
    assert response.status_code == 200
    events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
    assert re.fullmatch(REGEX, events[-1]["generated_text"]), events[-1]
    assert re.fullmatch(REGEX, "".join(e["token"]["text"] for e in events))


def test_generate_with_json_object_gives_an_object(server) -> None:
    body = {"inputs": "x", "parameters": {"grammar": {"type": "json_object"}, "max_new_tokens": 200}}
    answer = _ok(_post(server, "/generate", {**body, "parameters": {**body["parameters"], "details": True}}))
    if answer["details"]["finish_reason"] == "eos_token":  # random weights may still be inside a string at 200
        assert isinstance(json.loads(answer["generated_text"]), dict)
    else:
        assert answer["generated_text"].startswith("{")


@pytest.mark.parametrize("temperature", [0, 1.2])
def test_chat_response_format_json_schema_validates(server, temperature) -> None:
    body = {"messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 60, "temperature": temperature,
            "seed": 3, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA,
                                                                                  "strict": True}}}
    choice = _ok(_post(server, "/v1/chat/completions", body))["choices"][0]
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize("fields, check", [
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"regex": REGEX}}, lambda t: re.fullmatch(REGEX, t)),
    ({"guided_regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
    ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ({"structured_outputs": {"json": SCHEMA}}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ({"guided_grammar": 'root ::= "a" ("b" | "c")'}, lambda t: t in ("ab", "ac")),
    ({"structured_outputs": {"grammar": 'root ::= "a"+'}}, lambda t: re.fullmatch("a+", t)),
])
def test_completions_honour_vllms_fields(server, fields, check) -> None:
    body = {"prompt": "answer: ", "max_tokens": 60, "temperature": 0, **fields}
    assert check(_ok(_post(server, "/v1/completions", body))["choices"][0]["text"])


@pytest.mark.parametrize("fields, message", [
    ({"guided_regex": "a", "guided_choice": ["b"]}, "one structured output per request"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integr"}}}},
     "the json grammar could not be compiled"),
    ({"guided_grammar": "root ::= undefined"}, 'Rule "undefined" is not defined'),
    ({"response_format": {"type": "xml"}}, "`response_format.type` must be"),
    ({"structured_outputs": {"regex": "a", "whitespace": 1}}, "not supported: whitespace"),
])
def test_a_bad_constraint_is_a_422_even_when_streamed(server, fields, message) -> None:
    for stream in (False, True):
        body = {"prompt": "x", "max_tokens": 4, "stream": stream, **fields}
        response = _post(server, "/v1/completions", body)
        assert response.status_code == 422, response.text
        assert message in response.json()["error"]


def test_disable_grammar_support_refuses_with_tgis_words() -> None:
    server = TinyServer(tokenizer=char_tokenizer(), disable_grammar_support=True)
    try:
        generate = {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a+"}}}
        response = _post(server, "/generate", generate)
        assert response.status_code == 422
        assert response.json() == {"error": "Input validation error: grammar is not supported",
                                   "error_type": "validation"}
        chat = {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}
        assert "grammar is not supported" in _post(server, "/v1/chat/completions", chat).json()["error"]
        assert _ok(_post(server, "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2}}))
    finally:
        server.stop()
