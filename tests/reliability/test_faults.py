"""Faults inside the engine: a kernel that raises, and a KV cache too small.

The faulty backend is the CPU plugin with its attention wrapped so that one chosen step raises; it
declares no compiled decode stack, so every step goes through that attention.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.api.test_disconnects import engine_held
from tests.reliability.conftest import EngineServer, assert_drained, tiny_engine, wait_for
from tests.cpu_delegate import CPUDelegate
from tokenmill import hookimpl
from tokenmill.backend import Backend
from tokenmill.plugins import cpu
from tokenmill.registry import load_registry


class KernelFault(RuntimeError):
    """What the armed kernel raises."""


class FaultyAttention:
    """The CPU attention, raising once in the step after `arm()`."""

    def __init__(self, inner):
        self.inner = inner
        self.armed = threading.Event()

    def prepare(self, metadata) -> None:
        if self.armed.is_set():
            self.armed.clear()
            raise KernelFault("injected kernel fault")
        self.inner.prepare(metadata)

    def forward(self, *args, **kwargs):
        return self.inner.forward(*args, **kwargs)


class FaultyCPU(CPUDelegate):
    """The CPU plugin's hooks, with `FaultyAttention` and no compiled model."""

    reason = "the CPU, with a kernel that fails on demand"

    def __init__(self) -> None:
        self.attention: list[FaultyAttention] = []

    def arm(self) -> None:
        for attention in self.attention:
            attention.armed.set()

    @hookimpl
    def tokenmill_attention_backend(self, spec, layout):
        attention = FaultyAttention(cpu.tokenmill_attention_backend(spec, layout))
        self.attention.append(attention)
        return attention


@pytest.fixture(scope="module")
def faulty():
    plugin = FaultyCPU()
    backend = Backend(load_registry(extra_plugins=[("faulty", plugin)]), "faulty")
    server = EngineServer(tiny_engine(backend=backend))
    yield server, plugin
    server.stop()


def _post(server, path, body) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


@pytest.mark.timeout(120)
def test_a_raising_kernel_fails_its_step_and_the_server_goes_on(faulty) -> None:
    server, plugin = faulty
    body = {"inputs": "w5 w6", "parameters": {"max_new_tokens": 20}}
    results: dict[str, httpx.Response] = {}

    def call(name, path) -> None:
        results[name] = _post(server, path, body)

    threads = [threading.Thread(target=call, args=(name, path))
               for name, path in (("plain", "/generate"), ("stream", "/generate_stream"))]
    with engine_held(server.runner):  # both requests join the same, failing, step
        for thread in threads:
            thread.start()
        assert wait_for(lambda: server.service.in_flight == 2, 10)
        plugin.arm()
    for thread in threads:
        thread.join(timeout=60)
    plain, stream = results["plain"], results["stream"]
    assert plain.status_code == 424, plain.text
    assert plain.json()["error_type"] == "generation" and "injected kernel fault" in plain.json()["error"]
    last = json.loads([line for line in stream.text.splitlines() if line.startswith("data:")][-1][5:])
    assert last["error_type"] == "generation" and "injected kernel fault" in last["error"]
    assert_drained(server)
    after = _post(server, "/generate", body)
    assert after.status_code == 200 and after.json()["generated_text"]
    assert_drained(server)


@pytest.fixture(scope="module")
def small_cache():
    # 8 blocks of 16 tokens; `max_total_tokens` set past that on purpose, so validation lets a request
    # through that the cache can never hold, and the engine has to refuse it itself.
    engine = tiny_engine(kv_cache_bytes=64 << 10)
    server = EngineServer(engine, max_total_tokens=1024, max_input_tokens=1000)
    yield server
    server.stop()


@pytest.mark.timeout(120)
def test_a_request_larger_than_the_cache_gets_a_clear_error(small_cache) -> None:
    capacity = small_cache.engine.kv_capacity_tokens
    prompt = " ".join(["w5"] * (capacity + 16))
    response = _post(small_cache, "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 4}})
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()) == {"error", "error_type"}
    assert_drained(small_cache)
    assert _post(small_cache, "/generate", {"inputs": "w5", "parameters": {"max_new_tokens": 4}}).status_code == 200


@pytest.mark.timeout(180)
def test_a_cache_full_of_long_requests_preempts_and_finishes_all(small_cache) -> None:
    engine = small_cache.engine
    before = engine.scheduler.num_preemptions
    tokens = engine.kv_capacity_tokens // 3  # four of them need more blocks than there are
    body = {"prompt": "w5 w6 w7", "max_tokens": tokens, "ignore_eos": True}
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(_post(small_cache, "/v1/completions", body)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    assert all(r.json()["usage"]["completion_tokens"] == tokens for r in results)
    assert engine.scheduler.num_preemptions > before
    assert_drained(small_cache)
