"""Every field of every request body is honoured or refused, never silently ignored (issue #17, item 2).

The registry (`RequestBody.honoured` / `RequestBody.refused`) must cover each model's fields; every
honoured field must be read by the serving code; every refused one, given a value that asks for
something, must get a 422 naming it. Then spot checks that honoured fields change what comes back.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import httpx
import pytest
from pydantic.fields import FieldInfo

import tokenmill.api.app  # noqa: F401 - imports every route module, and with them every request model
from tokenmill.api.openai_schemas import ChatRequest, CompletionRequest
from tokenmill.api.schemas import GenerateParameters, RequestBody
from tokenmill.watermark import detect

API_DIR = Path(tokenmill.api.app.__file__).parent


def _request_models() -> list[type[RequestBody]]:
    found, todo = [], [RequestBody]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("tokenmill.api"):
                found.append(sub)
    return sorted(set(found), key=lambda m: (m.__module__, m.__name__))


MODELS = _request_models()


def test_the_walk_finds_both_apis_models() -> None:
    names = {m.__name__ for m in MODELS}
    assert {"GenerateRequest", "GenerateParameters", "CompatGenerateRequest", "ChatRequest", "ChatMessage",
            "CompletionRequest", "StreamOptions", "Tool", "FunctionDefinition"} <= names


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_is_honoured_or_refused(model) -> None:
    fields, honoured, refused = set(model.model_fields), set(model.honoured), set(model.refused)
    assert not fields - honoured - refused, f"{model.__name__}: neither honoured nor refused"
    assert not honoured & refused, f"{model.__name__}: both honoured and refused"
    assert not (honoured | refused) - fields, f"{model.__name__}: the registry names fields the model lacks"


def _names_read_by_the_server() -> set[str]:
    """Attribute names read anywhere in the serving code, and names read with getattr(x, "name")."""
    names = set()
    for path in API_DIR.rglob("*.py"):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) > 1
                  and isinstance(node.args[1], ast.Constant)):
                names.add(node.args[1].value)
    return names


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_honoured_field_is_read_by_the_server(model) -> None:
    read = _names_read_by_the_server()
    unread = {f for f in model.honoured if f not in read}
    assert not unread, f"{model.__name__}: honoured but never read: {sorted(unread)}"


# ---- refused fields: a 422 that names them -----------------------------------------------------------


def _asking_value(field: FieldInfo):
    """A value of the field's type that asks for something (neither None, empty, nor the default)."""
    default, annotation = field.default, str(field.annotation)
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)) and default is not None:
        return default + 1
    for marker, value in (("list[int]", [1]), ("list[str]", ["x"]), ("list", [{"type": "x"}]),
                          ("dict", {"type": "x"}), ("bool", True), ("int", 2), ("float", 2.0), ("str", "x")):
        if marker in annotation:
            return value
    return {"type": "x"}


BASES = {
    GenerateParameters: ("/generate", lambda field, value: {"inputs": "w5", "parameters": {field: value}}),
    ChatRequest: ("/v1/chat/completions", lambda field, value: {"messages": [{"role": "user", "content": "w5"}],
                                                                "max_tokens": 2, field: value}),
    CompletionRequest: ("/v1/completions", lambda field, value: {"prompt": "w5", "max_tokens": 2, field: value}),
}
REFUSED = [(model, field) for model in BASES for field in sorted(model.refused)]


@pytest.mark.parametrize("model, field", REFUSED, ids=[f"{m.__name__}.{f}" for m, f in REFUSED])
def test_a_refused_field_asking_for_something_gets_a_422_naming_it(tiny_server, model, field) -> None:
    value = _asking_value(model.model_fields[field])
    assert not model.refused[field].asks_nothing(value, model.model_fields[field].default)
    route, body = BASES[model]
    response = httpx.post(f"{tiny_server.url}{route}", json=body(field, value), timeout=60)
    assert response.status_code == 422, response.text
    error = response.json()
    assert set(error) == {"error", "error_type"} and field.split("_")[0] in error["error"].lower()
    assert error["error_type"] == model.refused[field].error_type


def test_a_refused_field_on_a_stream_is_refused_in_band(tiny_server) -> None:
    body = {"inputs": "w5", "parameters": {"grammar": {"type": "regex", "value": "(a+"}}}
    events = _events(httpx.post(f"{tiny_server.url}/generate_stream", json=body, timeout=60))
    assert len(events) == 1 and events[0]["error_type"] == "validation"
    assert events[0]["error"].startswith("Input validation error: the regex grammar could not be compiled: ")
    chat = {"messages": [{"role": "user", "content": "w5"}], "stream": True, "structural_tag": {"type": "x"}}
    response = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=chat, timeout=60)
    assert response.status_code == 422 and "`structural_tag`" in response.json()["error"]


@pytest.mark.parametrize("field, value", [("function_call", "none"), ("response_format", {"type": "text"}),
                                          ("store", False), ("modalities", ["text"]), ("service_tier", "auto"),
                                          ("best_of", 1), ("priority", 0), ("include_reasoning", True)])
def test_a_refused_field_asking_for_nothing_is_served(tiny_server, field, value) -> None:
    route, body = BASES[ChatRequest]
    assert httpx.post(f"{tiny_server.url}{route}", json=body(field, value), timeout=60).status_code == 200


@pytest.mark.parametrize("content", [
    [{"type": "text", "text": "w5"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
    [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
])
def test_non_text_content_parts_are_refused_naming_the_part(tiny_server, content) -> None:
    body = {"messages": [{"role": "system", "content": "w9"}, {"role": "user", "content": content}]}
    response = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 422
    part = next(i for i, p in enumerate(content) if p["type"] != "text")
    assert f"`messages[1].content[{part}]`" in response.json()["error"] and content[part]["type"] in response.text


# ---- honoured fields change what comes back ---------------------------------------------------------


def _events(response: httpx.Response) -> list:
    assert response.status_code == 200, response.text
    return [json.loads(line[5:]) for line in response.text.splitlines()
            if line.startswith("data:") and line[5:].strip() != "[DONE]"]


def _complete(server, **body) -> dict:
    body = {"prompt": "w5 w6 w7", "max_tokens": 8, "temperature": 0, "logprobs": 0, **body}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _token_ids(server, completion: dict) -> list[int]:
    tokens = completion["choices"][0]["logprobs"]["tokens"]
    return server.engine.tokenizer.convert_tokens_to_ids(tokens)


def test_logit_bias_minus_100_keeps_a_token_out_of_greedy_output(tiny_server) -> None:
    greedy = _token_ids(tiny_server, _complete(tiny_server))
    banned = greedy[0]
    biased = _token_ids(tiny_server, _complete(tiny_server, logit_bias={str(banned): -100}))
    assert banned not in biased and biased != greedy


def test_min_tokens_holds_back_eos(tiny_server) -> None:
    eos_first = _complete(tiny_server, logit_bias={"1": 100})  # EOS is now the greedy choice at every step
    assert eos_first["usage"]["completion_tokens"] == 1 and eos_first["choices"][0]["finish_reason"] == "stop"
    held = _complete(tiny_server, logit_bias={"1": 100}, min_tokens=4)
    assert held["usage"]["completion_tokens"] == 5  # four tokens, then EOS
    assert held["choices"][0]["finish_reason"] == "stop" and held["choices"][0]["text"]


def test_top_k_1_sampling_equals_greedy(tiny_server) -> None:
    greedy = _complete(tiny_server)["choices"][0]["text"]
    for seed in (1, 2, 3):
        assert _complete(tiny_server, temperature=1.5, seed=seed, top_k=1)["choices"][0]["text"] == greedy
    sampled = {_complete(tiny_server, temperature=1.5, seed=seed)["choices"][0]["text"] for seed in (1, 2, 3)}
    assert sampled != {greedy}  # without top_k the same seeds sample other text


def test_min_p_1_sampling_equals_greedy(tiny_server) -> None:
    greedy = _complete(tiny_server)["choices"][0]["text"]
    assert _complete(tiny_server, temperature=1.5, seed=4, min_p=1.0)["choices"][0]["text"] == greedy


def test_stop_token_ids_end_generation_and_their_text_is_kept_only_when_asked(tiny_server) -> None:
    greedy = _complete(tiny_server)
    ids = _token_ids(tiny_server, greedy)
    stop = ids[2]
    cut = ids.index(stop)
    stopped = _complete(tiny_server, stop_token_ids=[stop])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert _token_ids(tiny_server, stopped) == ids[: cut + 1]
    stop_text = greedy["choices"][0]["logprobs"]["tokens"][cut]
    assert not stopped["choices"][0]["text"].endswith(stop_text)
    kept = _complete(tiny_server, stop_token_ids=[stop], include_stop_str_in_output=True)
    assert kept["choices"][0]["text"].endswith(stop_text)


def test_include_stop_str_in_output_keeps_a_stop_string(tiny_server) -> None:
    text = _complete(tiny_server)["choices"][0]["text"]
    stop = text.split()[2]
    assert not _complete(tiny_server, stop=[stop])["choices"][0]["text"].endswith(stop)
    assert _complete(tiny_server, stop=[stop], include_stop_str_in_output=True)["choices"][0]["text"].endswith(stop)


def test_skip_special_tokens_false_keeps_special_tokens_in_the_text(tiny_server) -> None:
    forced = {"logit_bias": {"0": 100}, "max_tokens": 2}  # w0, the tokenizer's BOS: special, not a stop
    assert "w0" not in _complete(tiny_server, **forced)["choices"][0]["text"]
    assert _complete(tiny_server, skip_special_tokens=False, **forced)["choices"][0]["text"].split() == ["w0", "w0"]


def test_completion_logprobs_follow_openai(tiny_server) -> None:
    completion = _complete(tiny_server, logprobs=2)
    logprobs, usage = completion["choices"][0]["logprobs"], completion["usage"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == usage["completion_tokens"] == 8
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert logprob <= 0 and top[token] == logprob and 2 <= len(top) <= 3
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert _complete(tiny_server, logprobs=None)["choices"][0]["logprobs"] is None
    echoed = _complete(tiny_server, logprobs=1, echo=True)["choices"][0]
    assert echoed["text"].startswith("w5 w6 w7") and echoed["logprobs"]["tokens"][:3] == ["w5", "w6", "w7"]
    assert echoed["logprobs"]["token_logprobs"][0] is None and echoed["logprobs"]["top_logprobs"][0] is None


def test_streamed_completions_carry_logprobs_echo_and_usage(tiny_server) -> None:
    body = {"prompt": "w5 w6", "max_tokens": 4, "temperature": 0, "stream": True, "logprobs": 1, "echo": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = _events(httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=60))
    chunks, last = events[:-1], events[-1]
    whole = _complete(tiny_server, prompt="w5 w6", max_tokens=4, echo=True)["choices"][0]["text"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert all(c["choices"][0]["logprobs"]["top_logprobs"] for c in chunks if c["choices"][0]["logprobs"]["tokens"])
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 3, 4]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4


def _chat(server, messages=None, **body) -> httpx.Response:
    body = {"messages": messages or [{"role": "user", "content": "w5 w6"}], "max_tokens": 4, "temperature": 0,
            **body}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


def test_streamed_chat_carries_top_logprobs(tiny_server) -> None:
    events = _events(_chat(tiny_server, stream=True, logprobs=True, top_logprobs=2))
    entries = [e for c in events for e in (c["choices"][0]["logprobs"] or {"content": []})["content"]]
    assert len(entries) == 4 and all(len(e["top_logprobs"]) == 2 for e in entries)
    assert entries[0]["top_logprobs"][0]["logprob"] >= entries[0]["top_logprobs"][1]["logprob"]


def test_a_final_assistant_message_is_continued_unless_told_otherwise(tiny_server) -> None:
    turns = [{"role": "user", "content": "w5"}, {"role": "assistant", "content": "w9 w8"}]
    continued = _chat(tiny_server, turns).json()
    new_turn = _chat(tiny_server, turns, continue_final_message=False).json()
    # Continuing stops the prompt after the assistant's text; a new turn adds the generation prompt.
    assert continued["usage"]["prompt_tokens"] < new_turn["usage"]["prompt_tokens"]
    assert _chat(tiny_server, turns, continue_final_message=True).json()["usage"] == continued["usage"]
    echoed = _chat(tiny_server, turns, echo=True).json()["choices"][0]["message"]["content"]
    assert echoed == "w9 w8" + continued["choices"][0]["message"]["content"]
    refused = _chat(tiny_server, [{"role": "user", "content": "w5"}], continue_final_message=True)
    assert refused.status_code == 422 and "`continue_final_message`" in refused.json()["error"]


def test_add_generation_prompt_false_leaves_the_prompt_open(tiny_server) -> None:
    with_prompt = _chat(tiny_server).json()["usage"]["prompt_tokens"]
    assert _chat(tiny_server, add_generation_prompt=False).json()["usage"]["prompt_tokens"] < with_prompt


def test_chat_template_kwargs_that_would_change_the_call_are_refused(tiny_server) -> None:
    response = _chat(tiny_server, chat_template_kwargs={"tokenize": True})
    assert response.status_code == 422 and "`chat_template_kwargs.tokenize`" in response.json()["error"]
    assert _chat(tiny_server, chat_template_kwargs={"enable_thinking": False}).status_code == 200


def test_truncate_prompt_tokens_request_id_and_add_special_tokens(tiny_server) -> None:
    completion = _complete(tiny_server, prompt="w5 w6 w7 w8 w9", truncate_prompt_tokens=2, request_id="abc")
    assert completion["usage"]["prompt_tokens"] == 2 and completion["id"] == "cmpl-abc"
    assert _chat(tiny_server, request_id="xyz").json()["id"] == "chatcmpl-xyz"
    # The tiny tokenizer adds no special tokens, so add_special_tokens only has to be accepted here.
    assert _complete(tiny_server, add_special_tokens=False)["usage"]["prompt_tokens"] == 3


def test_user_is_recorded_on_the_request_span() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tokenmill.api.openai_api import _prepare

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("router /v1/chat/completions"):
        _prepare(ChatRequest(messages=[{"role": "user", "content": "w5"}], user="alice"))
    assert exporter.get_finished_spans()[0].attributes["enduser.id"] == "alice"


def test_watermark_on_generate_is_detected(tiny_server) -> None:
    def z_over_200_tokens(watermark: bool) -> float:
        """The z-score of the generations of successive seeds pooled, until they hold 200 tokens
        (/generate has no ignore_eos, and EOS may end one early)."""
        green = scored = 0
        for seed in range(1, 50):
            body = {"inputs": "w5 w6 w7", "parameters": {"max_new_tokens": 200 - scored, "do_sample": True,
                                                          "seed": seed, "details": True, "watermark": watermark}}
            response = httpx.post(f"{tiny_server.url}/generate", json=body, timeout=120)
            assert response.status_code == 200, response.text
            score = detect([7] + [t["id"] for t in response.json()["details"]["tokens"]])
            green, scored = green + score.num_green, scored + score.num_tokens
            if scored >= 200:
                return (green - 0.5 * scored) / (scored * 0.25) ** 0.5
        raise AssertionError("fewer than 200 tokens from 49 requests")

    assert z_over_200_tokens(True) > 4 > z_over_200_tokens(False)


def test_unknown_fields_are_ignored_and_logged(tiny_server, caplog) -> None:
    with caplog.at_level("WARNING", logger="tokenmill.api.schemas"):
        response = _chat(tiny_server, some_future_field=1)
    assert response.status_code == 200
    assert re.search(r"ignored unknown fields \['some_future_field'\]", caplog.text)


def test_the_new_sampling_fields_cross_the_model_server_protocol() -> None:
    from tokenmill.api.grpc.convert import params_from_pb, params_to_pb
    from tokenmill.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=9, min_tokens=3, stop_token_ids=(4, 9), logit_bias=((2, 1.5), (5, -100.0)),
                            watermark=True, watermark_gamma=0.25, watermark_delta=1.0, skip_special_tokens=False,
                            include_stop_str_in_output=False, top_k=3, min_p=0.1)
    assert params_from_pb(params_to_pb(params)) == params


@pytest.mark.parametrize("grammar", [None, ("regex", r"\d+"), ("json", '{"type": "object"}'), ("json_object", "")])
def test_a_grammar_crosses_the_model_server_protocol(grammar) -> None:
    from tokenmill.api.grpc.convert import params_from_pb, params_to_pb
    from tokenmill.grammar import GrammarSpec
    from tokenmill.sampling_params import SamplingParams

    params = SamplingParams(grammar=GrammarSpec(*grammar) if grammar else None)
    assert params_from_pb(params_to_pb(params)) == params
