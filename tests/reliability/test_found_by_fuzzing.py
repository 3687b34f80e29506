"""Regression tests for what the fuzzing found, each with the input that found it."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.reliability.conftest import TinyServer, assert_drained


@pytest.fixture(scope="module")
def server():
    server = TinyServer(max_concurrent_requests=8, max_total_tokens=128)
    yield server
    server.stop()


def test_a_top_k_past_the_vocabulary_fails_nobody(server) -> None:
    """`top_k` 158732765 indexed past the logits and failed the whole step: 424 for it and for every
    request batched with it. It now keeps every token, as TGI's warper does."""
    results: list[httpx.Response] = []
    bodies = [{"inputs": "w5 w6", "parameters": {"top_k": 158732765, "max_new_tokens": 8}},
              {"inputs": "w5 w6", "parameters": {"top_k": 2**70, "max_new_tokens": 8}},
              {"inputs": "w7", "parameters": {"max_new_tokens": 8}}]
    threads = [threading.Thread(target=lambda b=b: results.append(httpx.post(f"{server.url}/generate", json=b,
                                                                             timeout=60))) for b in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [r.status_code for r in results] == [200, 200, 200], [r.text for r in results]
    assert_drained(server)


def test_error_responses_are_documented_in_tgi_shape(server) -> None:
    """FastAPI documented a 422 body of {"detail": [...]}, which no route returns; `/health` was documented
    as JSON and answers an empty body."""
    document = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/generate", "/generate_stream", "/", "/v1/completions", "/v1/chat/completions", "/tokenize"):
        responses = document["paths"][path]["post"]["responses"]
        assert responses["422"]["content"]["application/json"]["schema"] == error, path
    assert "content" not in document["paths"]["/health"]["get"]["responses"]["200"]
    assert "text/event-stream" in document["paths"]["/generate_stream"]["post"]["responses"]["200"]["content"]
