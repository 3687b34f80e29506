"""LoRA adapters through HTTP: TGI's `adapter_id`, OpenAI's `model`, `/v1/models`, and the refusals; on a
tiny model served in-process, then through `tokenmill serve --lora-adapters/--lora-modules` (launcher,
internal gRPC, model server)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading

import httpx
import pytest
import uvicorn

from tests.api.conftest import free_port, wait_healthy
from tests.lora_adapters import ATTENTION, MLP, merged_checkpoint, write_adapter
from tests.tiny_models import build_tiny
from tokenmill.api.app import build_app
from tokenmill.api.server import ServeOptions, build_service
from tokenmill.engine import Engine, EngineConfig
from tokenmill.sampling_params import SamplingParams

PROMPTS = {None: "w5 w9 w33 w71 w2", "every": "w8 w12 w40 w41", "some": "w90 w91 w7 w200 w13 w14"}
MAX_NEW = 10


def _config(**overrides) -> EngineConfig:
    return EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=4 << 20, progress=False, model_id="tiny-llama",
                        **overrides)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    reference = build_tiny("llama").reference
    return {"every": write_adapter(folder / "every", reference, ATTENTION + MLP, seed=1),
            "some": write_adapter(folder / "some", reference, ("q_proj", "v_proj", "down_proj"), rank=4, seed=2)}


@pytest.fixture(scope="module")
def expected(adapters):
    """Per adapter (None: the base model), its prompt's greedy token ids and text, from merged weights."""
    tiny = build_tiny("llama")
    tokenizer = tiny.checkpoint().tokenizer
    results = {}
    for name, prompt in PROMPTS.items():
        checkpoint = tiny.checkpoint() if name is None else merged_checkpoint(tiny.checkpoint(), adapters[name])
        outputs = Engine(_config(), checkpoint=checkpoint).generate(
            [tokenizer(prompt).input_ids], SamplingParams(max_new_tokens=MAX_NEW))[0]
        results[name] = ([t.id for o in outputs for t in o.new_tokens], outputs[-1].generated_text)
    return results


@pytest.fixture(scope="module")
def server(adapters):
    engine = Engine(_config(lora_adapters=tuple((n, str(p)) for n, p in adapters.items())),
                    checkpoint=build_tiny("llama").checkpoint())
    service, metrics, runner = build_service(ServeOptions(engine=engine.config), engine)
    runner.start()
    service.ready = True
    port = free_port()
    app = build_app(service, metrics, f"127.0.0.1:{free_port()}")
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 30)
    yield url
    uvicorn_server.should_exit = True
    thread.join(timeout=10)
    runner.stop()


def _generate_body(name: str | None, adapter_id: str | None) -> dict:
    parameters = {"max_new_tokens": MAX_NEW, "details": True}
    if adapter_id is not None:
        parameters["adapter_id"] = adapter_id
    return {"inputs": PROMPTS[name], "parameters": parameters}


def _completion_body(name: str | None, model: str | None, **extra) -> dict:
    body = {"prompt": PROMPTS[name], "max_tokens": MAX_NEW, "temperature": 0, **extra}
    return body if model is None else {**body, "model": model}


async def _all_at_once(url: str) -> list[httpx.Response]:
    """Base and both adapters over both APIs, all in flight together: they share the engine's steps."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(
            *(client.post("/generate", json=_generate_body(name, name)) for name in PROMPTS),
            *(client.post("/v1/completions", json=_completion_body(name, name or "tiny-llama")) for name in PROMPTS))


def test_adapter_id_and_model_choose_the_adapter_in_one_batch(server, expected) -> None:
    responses = asyncio.run(_all_at_once(server))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    names = list(PROMPTS)
    for name, response in zip(names, responses[:3]):
        assert [t["id"] for t in response.json()["details"]["tokens"]] == expected[name][0], name
    for name, response in zip(names, responses[3:]):
        body = response.json()
        assert body["choices"][0]["text"] == expected[name][1], name
        assert body["model"] == (name or "tiny-llama")
    assert expected["every"][0] != expected[None][0] != expected["some"][0]  # the adapters change the answer


def test_streams_use_the_adapter_too(server, expected) -> None:
    response = httpx.post(f"{server}/generate_stream", json=_generate_body("some", "some"), timeout=60)
    events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
    assert [event["token"]["id"] for event in events] == expected["some"][0]
    response = httpx.post(f"{server}/v1/completions", json=_completion_body("every", "every", stream=True), timeout=60)
    chunks = [json.loads(line[5:]) for line in response.text.splitlines()
              if line.startswith("data:") and "[DONE]" not in line]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == expected["every"][1]


def test_the_base_model_answers_without_an_adapter_or_by_its_own_name(server, expected) -> None:
    for parameters in ({}, {"adapter_id": ""}, {"adapter_id": "tiny-llama"}):
        body = {"inputs": PROMPTS[None], "parameters": {"max_new_tokens": MAX_NEW, "details": True, **parameters}}
        tokens = httpx.post(f"{server}/generate", json=body, timeout=60).json()["details"]["tokens"]
        assert [t["id"] for t in tokens] == expected[None][0], parameters
    response = httpx.post(f"{server}/v1/completions", json=_completion_body(None, None), timeout=60)
    assert response.json()["choices"][0]["text"] == expected[None][1]


def test_v1_models_lists_the_base_model_then_the_adapters(server) -> None:
    data = httpx.get(f"{server}/v1/models", timeout=10).json()["data"]
    assert [entry["id"] for entry in data] == ["tiny-llama", "every", "some"]
    assert [entry.get("parent") for entry in data] == [None, "tiny-llama", "tiny-llama"]


def test_an_unknown_adapter_is_a_422_on_tgi_routes_and_a_404_on_openai_routes(server) -> None:
    response = httpx.post(f"{server}/generate", json=_generate_body(None, "nope"), timeout=60)
    assert response.status_code == 422
    assert response.json() == {"error": "Input validation error: `adapter_id` 'nope' is not a loaded LoRA adapter; "
                                        "loaded: every, some", "error_type": "validation"}
    for path, body in (("/v1/completions", _completion_body(None, "nope")),
                       ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "w5"}]}),
                       ("/v1/completions", _completion_body(None, "nope", stream=True))):
        response = httpx.post(f"{server}{path}", json=body, timeout=60)
        assert response.status_code == 404, path
        assert response.json() == {"error": "The model `nope` does not exist.", "error_type": "model_not_found"}


def test_tokenmill_serve_takes_both_flags_and_serves_the_adapters(adapters, expected, tmp_path) -> None:
    tiny = build_tiny("llama")
    model = tmp_path / "tiny-llama"
    tiny.reference.save_pretrained(model)
    tiny.checkpoint().tokenizer.save_pretrained(model)
    port = free_port()
    command = [sys.executable, "-m", "tokenmill.cli", "serve", "--hostname", "127.0.0.1", "--port", str(port),
               "--grpc-port", "0", "--model-id", str(model), "--dtype", "float32", "--kv-cache-bytes", str(4 << 20),
               "--lora-adapters", f"every={adapters['every']}", "--lora-modules", f"some={adapters['some']}"]
    process = subprocess.Popen(command, env={**os.environ, "LOG_LEVEL": "WARNING"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 180, process)
        assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]] == [str(model), "every",
                                                                                                "some"]
        response = httpx.post(f"{url}/generate", json=_generate_body("every", "every"), timeout=60)
        assert [t["id"] for t in response.json()["details"]["tokens"]] == expected["every"][0]
        response = httpx.post(f"{url}/v1/completions", json=_completion_body("some", "some"), timeout=60)
        assert response.json()["choices"][0]["text"] == expected["some"][1]
        response = httpx.post(f"{url}/generate", json=_generate_body(None, "nope"), timeout=60)
        assert response.status_code == 422 and "loaded: every, some" in response.json()["error"]
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
