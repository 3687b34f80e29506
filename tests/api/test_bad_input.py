"""Bad input gets a 4xx in TGI's error shape, never a 5xx: malformed, non-UTF-8, NaN, oversized, chunked."""

from __future__ import annotations

import httpx
import pytest

ROUTES = ["/generate", "/generate_stream", "/", "/v1/completions", "/v1/chat/completions"]


def _post_raw(server, path: str, content, headers=None) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=content, timeout=60,
                      headers={"content-type": "application/json", **(headers or {})})


def _assert_tgi_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}, body
    return body


MALFORMED = {
    "not json": b"this is not json",
    "truncated": b'{"inputs": "w5", "parameters": {',
    "invalid utf-8": b'{"inputs": "\xff\xfe w5"}',
    "deeply nested": b'{"inputs": "w5", "parameters": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "lone surrogate": b'{"inputs": "\\ud800", "prompt": "\\ud800", "messages": [{"role": "user", "content": "\\ud800"}]}',
    "NaN": b'{"inputs": "w5", "prompt": "w5", "messages": [{"role": "user", "content": "w5"}], '
           b'"parameters": {"temperature": NaN}, "temperature": NaN}',
    "Infinity": b'{"inputs": "w5", "prompt": "w5", "messages": [{"role": "user", "content": "w5"}], '
                b'"parameters": {"top_p": Infinity, "repetition_penalty": -Infinity}, "top_p": Infinity}',
    "wrong types": b'{"inputs": 5, "prompt": {"a": 1}, "messages": "hi", "parameters": []}',
    "null body": b"null",
    "empty body": b"",
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_bodies_get_a_4xx_in_tgi_shape(tiny_server, route, name) -> None:
    response = _post_raw(tiny_server, route, MALFORMED[name])
    assert 400 <= response.status_code < 500, (name, route, response.status_code, response.text)
    _assert_tgi_error(response, response.status_code)


def test_a_lone_surrogate_names_the_problem(tiny_server) -> None:
    body = _assert_tgi_error(_post_raw(tiny_server, "/generate", b'{"inputs": "w5 \\ud800"}'), 422)
    assert "valid UTF-8" in body["error"]


def test_nan_temperature_is_refused_on_the_tgi_routes(tiny_server) -> None:
    body = b'{"inputs": "w5", "parameters": {"temperature": NaN, "max_new_tokens": 2}}'
    _assert_tgi_error(_post_raw(tiny_server, "/generate", body), 422)


def test_a_chunked_body_over_the_limit_gets_413(tiny_server) -> None:
    limit = tiny_server.service.settings.payload_limit

    def chunks():  # no Content-Length: httpx sends a generator chunked
        yield b'{"inputs": "'
        for _ in range(4 * limit // 1000):
            yield b"w5 " * 333 + b"w"
        yield b'"}'

    response = _post_raw(tiny_server, "/generate", chunks())
    body = _assert_tgi_error(response, 413)
    assert body["error_type"] == "payload_too_large"


def test_a_chunked_body_under_the_limit_is_served(tiny_server) -> None:
    def chunks():
        yield b'{"inputs": "w5 w6", '
        yield b'"parameters": {"max_new_tokens": 2}}'

    assert _post_raw(tiny_server, "/generate", chunks()).status_code == 200
