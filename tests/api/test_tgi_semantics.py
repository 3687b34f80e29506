"""TGI's answers where TGI has them (issue #17, item 3): stop sequences, null keys in `details`, the
OpenAPI document's address, `/info`, the `x-compute-*` headers; and where /v1 follows OpenAI instead."""

from __future__ import annotations

import json

import httpx
import pytest

TGI_INFO_KEYS = {"model_id", "model_sha", "model_pipeline_tag", "max_concurrent_requests", "max_best_of",
                 "max_stop_sequences", "max_input_tokens", "max_total_tokens", "validation_workers",
                 "max_client_batch_size", "router", "version", "sha", "docker_label"}
TIMING = {"x-compute-type", "x-compute-time", "x-compute-characters", "x-total-time", "x-validation-time",
          "x-queue-time", "x-inference-time", "x-time-per-token", "x-prompt-tokens", "x-generated-tokens"}


def _post(server, path: str, body: dict) -> httpx.Response:
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response


def _generate(server, **parameters) -> dict:
    return _post(server, "/generate", {"inputs": "w5 w6", "parameters": {"max_new_tokens": 8, **parameters}}).json()


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.text.splitlines()
            if line.startswith("data:") and line[5:].strip() != "[DONE]"]


@pytest.fixture(scope="module")
def stop_word(tiny_server) -> str:
    """The third word of the greedy continuation of "w5 w6": a stop sequence that is sure to match."""
    return _generate(tiny_server)["generated_text"].split()[2]


def test_a_stop_sequence_ends_with_stop_sequence_and_stays_in_the_text_on_tgi_routes(tiny_server, stop_word):
    answer = _generate(tiny_server, stop=[stop_word], details=True)
    assert answer["details"]["finish_reason"] == "stop_sequence"
    assert answer["generated_text"].endswith(stop_word) and answer["generated_text"].split()[-1] == stop_word
    body = {"inputs": "w5 w6", "parameters": {"max_new_tokens": 8, "stop": [stop_word], "details": True}}
    last = _events(_post(tiny_server, "/generate_stream", body))[-1]
    assert last["details"]["finish_reason"] == "stop_sequence" and last["generated_text"] == answer["generated_text"]


def test_v1_follows_openai_for_a_stop_sequence_and_invocations_follows_tgi(tiny_server, stop_word):
    chat = {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 8, "temperature": 0}
    plain = _post(tiny_server, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    stop = plain.split()[1]
    openai = _post(tiny_server, "/v1/chat/completions", {**chat, "stop": [stop]}).json()["choices"][0]
    assert openai["finish_reason"] == "stop" and not openai["message"]["content"].endswith(stop)
    tgi = _post(tiny_server, "/invocations", {**chat, "stop": [stop]}).json()["choices"][0]
    assert tgi["finish_reason"] == "stop_sequence" and tgi["message"]["content"].endswith(stop)
    completion = _post(tiny_server, "/v1/completions", {"prompt": "w5 w6", "max_tokens": 8, "temperature": 0,
                                                        "stop": [stop_word]}).json()["choices"][0]
    assert completion["finish_reason"] == "stop" and not completion["text"].endswith(stop_word)


def test_details_keep_tgis_null_keys_and_omit_what_tgi_omits(tiny_server):
    greedy = _generate(tiny_server, details=True)["details"]
    assert "seed" in greedy and greedy["seed"] is None
    assert greedy["prefill"] == [] and "top_tokens" not in greedy and "best_of_sequences" not in greedy
    prefill = _generate(tiny_server, decoder_input_details=True)["details"]["prefill"]
    assert prefill[0] == {"id": 5, "text": "w5", "logprob": None}
    assert prefill[1]["text"] == "w6" and prefill[1]["logprob"] < 0
    assert "details" not in _generate(tiny_server)
    assert len(_generate(tiny_server, details=True, top_n_tokens=2)["details"]["top_tokens"]) == 8
    assert _generate(tiny_server, details=True, do_sample=True, seed=3)["details"]["seed"] == 3


def test_a_token_a_warper_removed_has_a_null_logprob_on_tgi_routes_and_a_floor_on_v1(tiny_server):
    details = _generate(tiny_server, do_sample=True, top_k=1, top_n_tokens=3, details=True)["details"]
    assert [t["logprob"] for t in details["top_tokens"][0]][1:] == [None, None]
    chat = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2, "temperature": 1.0, "top_k": 1,
            "logprobs": True, "top_logprobs": 3}
    tops = _post(tiny_server, "/v1/chat/completions", chat).json()["choices"][0]["logprobs"]["content"][0]
    assert [t["logprob"] for t in tops["top_logprobs"]][1:] == [-9999.0, -9999.0]


def test_the_openapi_document_is_also_where_tgi_serves_it(tiny_server):
    tgi = httpx.get(f"{tiny_server.url}/api-doc/openapi.json")
    assert tgi.status_code == 200
    assert tgi.json() == httpx.get(f"{tiny_server.url}/openapi.json").json()
    assert "/generate" in tgi.json()["paths"]


def test_info_has_tgis_fields(tiny_server):
    info = httpx.get(f"{tiny_server.url}/info").json()
    assert set(info) == TGI_INFO_KEYS | {"model_implementation"}  # ours: whose code runs the model
    assert info["model_implementation"] == "tokenmill"  # the tiny Llama is one of ours
    assert info["router"] == "text-generation-router" and info["max_total_tokens"] > info["max_input_tokens"]


def test_chat_and_completions_carry_the_x_compute_headers(tiny_server):
    chat = _post(tiny_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "w5 w6"}],
                                                       "max_tokens": 3, "temperature": 0})
    assert TIMING <= set(chat.headers)
    usage = chat.json()["usage"]
    assert int(chat.headers["x-prompt-tokens"]) == usage["prompt_tokens"]
    assert int(chat.headers["x-generated-tokens"]) == usage["completion_tokens"] == 3
    # The characters of the templated prompt: "user: w5 w6 assistant: " under the test template.
    assert chat.headers["x-compute-characters"] == str(len("user: w5 w6 assistant: "))
    assert float(chat.headers["x-compute-time"]) * 1000 >= int(chat.headers["x-inference-time"])
    completion = _post(tiny_server, "/v1/completions", {"prompt": ["w5", "w6 w7"], "max_tokens": 2})
    assert {k for k in completion.headers if k.startswith("x-")} == TIMING - {"x-compute-time"}  # as TGI
    assert int(completion.headers["x-generated-tokens"]) == 4 and completion.headers["x-prompt-tokens"] == "3"
    stream = _post(tiny_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}],
                                                         "max_tokens": 2, "stream": True})
    assert stream.headers["x-compute-type"]
    assert stream.headers["x-compute-characters"] == str(len("user: w5 assistant: "))
