"""Bad input gets a 4xx in TGI's error shape, never a 5xx: malformed, non-UTF-8, NaN, oversized, chunked, empty
lists, negative integers; and a message that names the field."""

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


CHAT = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2}


@pytest.mark.parametrize("route, body, message", [
    ("/v1/chat/completions", {"messages": []}, "`messages` must contain at least one message"),
    ("/v1/chat/completions", {"messages": [], "stream": True}, "`messages` must contain at least one message"),
    ("/v1/completions", {"prompt": []}, "`prompt` must be a string or a list of at least one string"),
    ("/v1/completions", {"prompt": [], "stream": True}, "`prompt` must be a string or a list of at least one string"),
])
def test_an_empty_list_is_refused_with_a_message_that_names_it(tiny_server, route, body, message) -> None:
    error = _assert_tgi_error(httpx.post(f"{tiny_server.url}{route}", json=body, timeout=60), 422)
    assert error == {"error": f"Input validation error: {message}", "error_type": "validation"}


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {**CHAT, "stop": []}),
    ("/v1/completions", {"prompt": "w5", "max_tokens": 2, "stop": []}),
    ("/generate", {"inputs": "w5", "parameters": {"max_new_tokens": 2, "stop": []}}),
])
def test_an_empty_stop_list_is_served(tiny_server, route, body) -> None:
    assert httpx.post(f"{tiny_server.url}{route}", json=body, timeout=60).status_code == 200


def test_the_largest_seed_is_valid_for_every_choice(tiny_server) -> None:
    body = {"prompt": "w5", "max_tokens": 2, "n": 2, "seed": 2**64 - 1}
    response = httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/", "/tokenize"])
@pytest.mark.parametrize("truncate", [-1, -1000])
def test_a_negative_truncate_gets_422_before_any_work(tiny_server, route, truncate) -> None:
    body = {"inputs": "w5 w6 w7", "parameters": {"max_new_tokens": 2, "truncate": truncate}}
    error = _assert_tgi_error(httpx.post(f"{tiny_server.url}{route}", json=body, timeout=60), 422)
    assert error["error_type"] == "validation" and "truncate" in error["error"]


def test_tokenize_refuses_a_zero_truncate(tiny_server) -> None:
    body = {"inputs": "w5 w6 w7", "parameters": {"truncate": 0}}
    error = _assert_tgi_error(httpx.post(f"{tiny_server.url}/tokenize", json=body, timeout=60), 422)
    assert error == {"error": "Input validation error: `truncate` must be strictly positive. Given: 0",
                     "error_type": "validation"}


def test_tokenize_keeps_the_last_truncate_tokens(tiny_server) -> None:
    def tokenize(**parameters) -> list[dict]:
        body = {"inputs": "w5 w6 w7", "parameters": parameters}
        response = httpx.post(f"{tiny_server.url}/tokenize", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    everything = tokenize()
    assert len(everything) >= 3
    assert tokenize(truncate=2) == everything[-2:]
    assert tokenize(truncate=10_000) == everything  # no upper bound on /tokenize, as in TGI
