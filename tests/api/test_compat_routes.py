"""SageMaker's `/invocations`, Vertex AI's `/vertex`, vLLM's `/tokenize` bodies, `/detokenize` and `/version`:
each answers as the route it stands for, and refuses a bad body in TGI's error shape."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.api.conftest import TinyServer

GREEDY = {"do_sample": False, "max_new_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    server = TinyServer(max_concurrent_requests=8)
    yield server
    server.stop()


def _post(server, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kwargs)


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}, body
    return body["error"]


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[len("data:"):]) for line in response.text.splitlines()
            if line.startswith("data:") and "[DONE]" not in line]


# ---- /invocations ---------------------------------------------------------------------------------


def test_invocations_answers_a_tgi_body_as_post_slash_does(server) -> None:
    body = {"inputs": "w5 w6 w7", "parameters": GREEDY}
    answer = _post(server, "/invocations", body)
    assert answer.status_code == 200
    assert answer.json() == _post(server, "/", body).json()
    assert isinstance(answer.json(), list) and answer.json()[0]["generated_text"].startswith("w5 w6 w7")


def test_invocations_streams_a_tgi_body_that_asks_for_it(server) -> None:
    answer = _post(server, "/invocations", {"inputs": "w5 w6", "parameters": GREEDY, "stream": True})
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = _events(answer)
    assert [e["index"] for e in events] == [1, 2, 3, 4]
    expected = _post(server, "/", {"inputs": "w5 w6", "parameters": GREEDY}).json()[0]["generated_text"]
    assert events[-1]["generated_text"] == expected  # the prompt first, as `POST /` streams it


def test_invocations_answers_chat_and_completion_bodies(server) -> None:
    chat = _post(server, "/invocations", CHAT).json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"] == \
        _post(server, "/v1/chat/completions", CHAT).json()["choices"][0]["message"]["content"]
    completion_body = {"prompt": "w5 w6", "max_tokens": 3, "temperature": 0}
    completion = _post(server, "/invocations", completion_body).json()
    assert completion["object"] == "text_completion"
    openai = _post(server, "/v1/completions", completion_body).json()
    assert completion["choices"][0]["text"] == openai["choices"][0]["text"]


def test_invocations_tries_tgi_s_body_first(server) -> None:
    """TGI's untagged enum: a body with `inputs` is a generate request, whatever else it holds."""
    answer = _post(server, "/invocations", {"inputs": "w5", "prompt": "w6", "parameters": GREEDY}).json()
    assert isinstance(answer, list) and answer[0]["generated_text"].startswith("w5")


@pytest.mark.parametrize("body, status, words", [
    ({"text": "w5"}, 422, ["`inputs` (generate)", "`messages` (chat)", "`prompt` (completion)"]),
    ([{"inputs": "w5"}], 422, ["`inputs` (generate)"]),
    ({"inputs": 5}, 422, ["generate.inputs"]),
    ({"messages": "w5"}, 422, ["chat.messages"]),
    ({"inputs": "w5", "parameters": {"temperature": -1}}, 422, ["`temperature` must be strictly positive"]),
    ({"messages": [{"role": "user", "content": "w5"}], "top_p": 0}, 422, ["top_p"]),
])
def test_invocations_refuses_bad_bodies_in_tgi_s_shape(server, body, status, words) -> None:
    message = _error(_post(server, "/invocations", body), status)
    for word in words:
        assert word in message


def test_invocations_refuses_a_body_that_is_not_json(server) -> None:
    response = httpx.post(f"{server.url}/invocations", content=b'{"inputs": ', timeout=60,
                          headers={"content-type": "application/json"})
    assert "Malformed JSON body" in _error(response, 400)


# ---- /vertex --------------------------------------------------------------------------------------


def _generated(server, inputs: str, **parameters) -> str:
    return _post(server, "/generate", {"inputs": inputs, "parameters": parameters}).json()["generated_text"]


def test_vertex_predicts_each_instance_in_order(server) -> None:
    body = {"instances": [{"inputs": "w5 w6", "parameters": GREEDY}, {"inputs": "w9", "parameters": GREEDY}, CHAT]}
    answer = _post(server, "/vertex", body)
    assert answer.status_code == 200
    chat = _post(server, "/v1/chat/completions", CHAT).json()["choices"][0]["message"]["content"]
    assert answer.json() == {"predictions": [_generated(server, "w5 w6", **GREEDY), _generated(server, "w9", **GREEDY),
                                             chat]}


def test_vertex_top_level_parameters_apply_to_every_instance_under_its_own(server) -> None:
    body = {"instances": [{"inputs": "w5 w6"}, {"inputs": "w5 w6", "parameters": {"max_new_tokens": 6}}],
            "parameters": {"do_sample": False, "max_new_tokens": 2}}
    predictions = _post(server, "/vertex", body).json()["predictions"]
    assert predictions == [_generated(server, "w5 w6", do_sample=False, max_new_tokens=2),
                           _generated(server, "w5 w6", do_sample=False, max_new_tokens=6)]


@pytest.mark.parametrize("body, words", [
    ({"instances": []}, ["`instances` cannot be empty"]),
    ({}, ["instances: Field required"]),
    ({"instances": [{"text": "w5"}]}, ["instances.0", "`inputs` (generate)", "`messages` (chat)"]),
    ({"instances": [{"inputs": "w5", "parameters": {"top_k": 0}}]}, ["`top_k` must be strictly positive"]),
    ({"instances": [{"inputs": "w5"}], "parameters": {"top_p": 1.0}}, ["`top_p` must be > 0.0 and < 1.0"]),
])
def test_vertex_refuses_bad_bodies_in_tgi_s_shape(server, body, words) -> None:
    message = _error(_post(server, "/vertex", body), 422)
    for word in words:
        assert word in message


# ---- /tokenize, /detokenize, /version --------------------------------------------------------------


def test_tokenize_keeps_tgi_s_body_and_answer(server) -> None:
    tokens = _post(server, "/tokenize", {"inputs": "w5 w6"}).json()
    assert tokens[-2:] == [{"id": 5, "text": "w5", "start": 0, "stop": 2},
                           {"id": 6, "text": "w6", "start": 3, "stop": 5}]


def test_tokenize_answers_vllm_s_prompt_body_as_vllm_does(server) -> None:
    tgi = [t["id"] for t in _post(server, "/tokenize", {"inputs": "w5 w6"}).json()]
    answer = _post(server, "/tokenize", {"prompt": "w5 w6", "return_token_strs": True}).json()
    info = httpx.get(f"{server.url}/info").json()
    assert answer == {"count": len(tgi), "max_model_len": info["max_total_tokens"], "tokens": tgi,
                      "token_strs": [server.engine.tokenizer.convert_ids_to_tokens(i) for i in tgi]}
    bare = _post(server, "/tokenize", {"prompt": "w5 w6", "add_special_tokens": False}).json()
    assert bare["tokens"] == [5, 6] and bare["token_strs"] is None


def test_tokenize_renders_vllm_s_chat_body_as_the_chat_route_does(server) -> None:
    messages = [{"role": "user", "content": "w5 w6"}]
    answer = _post(server, "/tokenize", {"messages": messages}).json()
    usage = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()["usage"]
    assert answer["count"] == len(answer["tokens"]) == usage["prompt_tokens"]
    bare = _post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert bare["tokens"] == answer["tokens"][: bare["count"]] and bare["count"] < answer["count"]


@pytest.mark.parametrize("body, words", [
    ({"text": "w5"}, ["`inputs` (tgi)", "`prompt` (completion)", "`messages` (chat)"]),
    ({"prompt": 5}, ["completion.prompt"]),
    ({"messages": [{"role": "user", "content": "w5"}], "chat_template": "{{ 1 }}"}, ["`chat_template`"]),
    ({"messages": [{"role": "user", "content": "w5"}], "mm_processor_kwargs": {"a": 1}}, ["`mm_processor_kwargs`"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, ["image_url"]),
    ({"messages": [{"role": "assistant", "content": "w5"}], "continue_final_message": True,
      "add_generation_prompt": True}, ["cannot both be true"]),
])
def test_tokenize_refuses_bad_vllm_bodies_in_tgi_s_shape(server, body, words) -> None:
    message = _error(_post(server, "/tokenize", body), 422)
    for word in words:
        assert word in message


def test_detokenize_inverts_tokenize(server) -> None:
    tokens = _post(server, "/tokenize", {"prompt": "w5 w6 w7", "add_special_tokens": False}).json()["tokens"]
    assert _post(server, "/detokenize", {"tokens": tokens}).json() == {"prompt": "w5 w6 w7"}


@pytest.mark.parametrize("body, words", [
    ({"tokens": [5, 10**9]}, ["token id 1000000000 is outside the vocabulary"]),
    ({"tokens": [-1]}, ["token id -1"]),
    ({"tokens": ["w5"]}, ["tokens.0"]),
    ({}, ["tokens: Field required"]),
])
def test_detokenize_refuses_bad_bodies_in_tgi_s_shape(server, body, words) -> None:
    message = _error(_post(server, "/detokenize", body), 422)
    for word in words:
        assert word in message


def test_version_is_the_server_s(server) -> None:
    assert httpx.get(f"{server.url}/version").json() == {"version": httpx.get(f"{server.url}/info").json()["version"]}


def test_the_new_routes_are_documented_once_with_tgi_s_error_body(server) -> None:
    document = httpx.get(f"{server.url}/openapi.json").json()
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/invocations", "/vertex", "/tokenize", "/detokenize"):
        assert document["paths"][path]["post"]["responses"]["422"]["content"]["application/json"]["schema"] == error
    forms = document["paths"]["/tokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert len(forms["oneOf"]) == 3
    assert "get" in document["paths"]["/version"]


def test_generation_routes_need_the_api_key() -> None:
    server = TinyServer(api_key="secret")
    try:
        bodies = {"/invocations": {"inputs": "w5", "parameters": GREEDY}, "/vertex": {"instances": [{"inputs": "w5"}]},
                  "/tokenize": {"prompt": "w5"}, "/detokenize": {"tokens": [5]}}
        for path, body in bodies.items():
            assert _post(server, path, body).status_code == 401, path
            assert _post(server, path, body, headers={"authorization": "Bearer secret"}).status_code == 200, path
        assert httpx.get(f"{server.url}/version").status_code == 200
    finally:
        server.stop()
