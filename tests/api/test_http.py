"""TGI's validation, error bodies and status codes, metrics, and cancellation, on a tiny-model server."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

LONG = " ".join(["w7"] * 2000)


def _post(server, path: str, body=None, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kwargs)


def _generate(inputs="w5 w6 w7", **parameters) -> dict:
    return {"inputs": inputs, "parameters": {"max_new_tokens": 4, **parameters}}


@pytest.mark.parametrize("body, message", [
    (_generate(temperature=-1.0), "`temperature` must be strictly positive"),
    (_generate(temperature=0.0), "`temperature` must be strictly positive"),
    (_generate(top_p=1.0), "`top_p` must be > 0.0 and < 1.0"),
    (_generate(top_k=0), "`top_k` must be strictly positive"),
    (_generate(typical_p=0.0), "`typical_p` must be > 0.0 and < 1.0"),
    (_generate(repetition_penalty=0.0), "`repetition_penalty` must be strictly positive"),
    (_generate(frequency_penalty=5.0), "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    (_generate(max_new_tokens=0), "`max_new_tokens` must be strictly positive"),
    (_generate(stop=["a", "b", "c", "d", "e"]), "`stop` supports up to 4 stop sequences. Given: 5"),
    (_generate(top_n_tokens=9), "`top_n_tokens` must be >= 0 and <= 5. Given: 9"),
    (_generate(best_of=2), "you must use sampling when `best_of` is > 1"),
    (_generate(best_of=3, do_sample=True), "`best_of` must be > 0 and <= 2. Given: 3"),
    (_generate(best_of=2, do_sample=True, seed=1), "`seed` must not be set when `best_of` > 1"),
    (_generate(truncate=0), "`truncate` must be strictly positive"),
    (_generate(inputs=""), "`inputs` cannot be empty"),
    (_generate(inputs=LONG), "`inputs` must have less than"),
    (_generate(max_new_tokens=100_000), "`inputs` tokens + `max_new_tokens` must be <="),
    (_generate(grammar={"type": "regex", "value": "(a+"}), "the regex grammar could not be compiled: Regex parsing"),
    (_generate(grammar={"type": "json", "value": "{no"}), "the JSON schema is not valid JSON"),
])
def test_tgi_validation_errors(tiny_server, body, message) -> None:
    response = _post(tiny_server, "/generate", body)
    assert response.status_code == 422
    payload = response.json()
    assert payload["error_type"] == "validation"
    assert payload["error"].startswith("Input validation error: ") and message in payload["error"]


def test_streaming_validation_errors_arrive_as_one_event(tiny_server) -> None:
    response = _post(tiny_server, "/generate_stream", _generate(temperature=-2.0))
    assert response.status_code == 200
    events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
    assert events == [{"error": "Input validation error: `temperature` must be strictly positive",
                       "error_type": "validation"}]


def test_malformed_oversized_and_mistyped_bodies(tiny_server) -> None:
    bad_json = httpx.post(f"{tiny_server.url}/generate", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error_type"] == "validation"
    mistyped = _post(tiny_server, "/generate", {"inputs": 5, "parameters": {"max_new_tokens": "many"}})
    assert mistyped.status_code == 422 and "error" in mistyped.json()
    huge = _post(tiny_server, "/generate", {"inputs": "w5 " * 20_000})
    assert huge.status_code == 413 and huge.json()["error_type"] == "payload_too_large"
    no_suffix = _post(tiny_server, "/v1/completions", {"prompt": "w5", "suffix": "w6"})
    assert no_suffix.status_code == 422 and no_suffix.json()["error_type"] == "suffix not supported"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    unknown_tool = _post(tiny_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}],
                                                               "tools": tools, "tool_choice": "g"})
    assert unknown_tool.status_code == 422 and unknown_tool.json()["error_type"] == "tool_error"


def test_the_server_stays_healthy_and_leaks_no_blocks_after_bad_input(tiny_server) -> None:
    for body in (_generate(temperature=-1), {"inputs": ""}, _generate(inputs=LONG)):
        _post(tiny_server, "/generate", body)
    ok = _post(tiny_server, "/generate", _generate(details=True))
    assert ok.status_code == 200 and ok.json()["details"]["generated_tokens"] == 4
    assert int(ok.headers["x-generated-tokens"]) == 4 and "x-inference-time" in ok.headers
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
    engine = tiny_server.engine
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_overload_answers_429(tiny_server) -> None:
    # The four admission slots are held the way a handler holds one for a whole stream. Held by real
    # streams instead, the tiny model could finish 1,000 tokens before the fifth request landed.
    service = tiny_server.service
    with contextlib.ExitStack() as held:
        for _ in range(service.settings.max_concurrent_requests):
            held.enter_context(service.admit())
        response = _post(tiny_server, "/generate", _generate())
        assert service.in_flight == 4
    assert response.status_code == 429
    assert response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert _post(tiny_server, "/generate", _generate()).status_code == 200


def test_metrics_parse_and_move(tiny_server) -> None:
    def sample(name: str) -> float:
        text = httpx.get(f"{tiny_server.url}/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        return sum(s.value for s in families[name].samples if s.name.endswith("_total") or s.name == name)

    before = sample("tgi_request_success")
    _post(tiny_server, "/generate", _generate())
    _post(tiny_server, "/generate", _generate(temperature=-1))
    assert sample("tgi_request_success") >= before + 1
    assert sample("tgi_request_failure") >= 1
    text = httpx.get(f"{tiny_server.url}/metrics").text
    for name in ("tgi_queue_size", "tgi_batch_current_size", "tgi_request_duration_bucket",
                 "tokenmill_kv_cache_usage_ratio", "tokenmill_prefix_cache_hit_rate", "tgi_request_input_length"):
        assert name in text


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(tiny_server) -> None:
    engine = tiny_server.engine
    body = {"inputs": "w5 w6 w7 w8", "parameters": {"max_new_tokens": 500}}
    # A client starved by a loaded machine may read its 7 lines only after the tiny model wrote all 500
    # tokens; then nothing was in flight at the disconnect, and the request is sent again.
    for _ in range(5):
        with httpx.stream("POST", f"{tiny_server.url}/generate_stream", json=body, timeout=60) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i > 6:
                    break
            in_flight = engine.block_manager.num_free_blocks < engine.num_blocks
        if in_flight:
            break
    assert in_flight, "every request finished before its client disconnected"
    deadline = time.monotonic() + 10
    while engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    usage = [line for line in httpx.get(f"{tiny_server.url}/metrics").text.splitlines()
             if line.startswith("tokenmill_kv_cache_usage_ratio")]
    assert usage and float(usage[0].split()[-1]) == 0.0


def test_info_models_tokenize_and_compat_route(tiny_server) -> None:
    info = httpx.get(f"{tiny_server.url}/info").json()
    assert info["model_id"] == "tiny-llama" and info["max_best_of"] == 2
    models = httpx.get(f"{tiny_server.url}/v1/models").json()
    assert models["data"][0]["id"] == "tiny-llama"
    tokens = _post(tiny_server, "/tokenize", {"inputs": "w5 w6"}).json()
    assert [t["id"] for t in tokens] == [5, 6] and tokens[1]["text"] == "w6"
    compat = _post(tiny_server, "/", {"inputs": "w5", "parameters": {"max_new_tokens": 2, "do_sample": False}})
    assert isinstance(compat.json(), list) and compat.json()[0]["generated_text"].startswith("w5")


def test_best_of_returns_the_other_sequences(tiny_server) -> None:
    response = _post(tiny_server, "/generate", _generate(best_of=2, do_sample=True, details=True))
    details = response.json()["details"]
    assert len(details["best_of_sequences"]) == 1


def test_chat_stream_ends_with_done_and_usage(tiny_server) -> None:
    body = {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    lines = [line for line in _post(tiny_server, "/v1/chat/completions", body).text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][5:])["usage"]
    assert usage["completion_tokens"] == 3
