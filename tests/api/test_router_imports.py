"""The router process imports no torch: `tokenmill serve` in front of a model server is FastAPI, gRPC and a
tokenizer, and torch (with tokenmill's engine, models and loader) would cost it about a second of CPU and
a quarter GiB at every start, beside the model server that needs them (issue #22)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import ThreadedModelServer, free_port, wait_healthy
from tokenmill.loader import load_tokenizer

# What the router must not import. A process that imported torch maps its shared library, libtorch.
ENGINE_MODULES = ("torch", "tokenmill.engine", "tokenmill.models", "tokenmill.loader.checkpoint",
                  "tokenmill.async_engine")

def maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_the_modules_serve_imports_for_the_router_import_no_engine() -> None:
    code = ("import sys; import tokenmill.cli, tokenmill.api.server, tokenmill.api.grpc.public_server; "
            f"print(' '.join(m for m in {ENGINE_MODULES!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], "the router imports these (find who with python -X importtime)"


@pytest.fixture(scope="module")
def smollm2_model_server():
    """`tokenmill model-server` on the embedded SmolLM2 GGUF, in this process, with the default cache dir: the
    model's tokenizer is cached there by the time it is ready, as on every start but a machine's first
    (without it the router builds the tokenizer with transformers' GGUF reader, which imports torch)."""
    server = ThreadedModelServer(["--kv-cache-bytes", str(64 << 20)])
    yield server.address
    server.stop()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps (Linux)")
def test_a_router_serves_a_separate_model_server_without_torch(smollm2_model_server) -> None:
    port = free_port()
    router = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--hostname", "127.0.0.1",
                               "--port", str(port), "--grpc-port", str(free_port()),
                               "--model-server", smollm2_model_server], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 120, router)
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1, chat.text
        tokens = httpx.post(f"{url}/tokenize", json={"inputs": "The capital of France"}, timeout=60)
        assert [t["id"] for t in tokens.json()] == load_tokenizer()("The capital of France").input_ids
        refused = httpx.post(f"{url}/generate", timeout=60,
                             json={"inputs": "Hi", "parameters": {"max_new_tokens": 2, "temperature": -1}})
        assert refused.status_code == 422 and refused.json()["error_type"] == "validation", refused.text
        assert "tgi_request_count" in httpx.get(f"{url}/metrics", timeout=60).text
        assert not maps_torch(router.pid), "the router process imported torch"
    finally:
        router.kill()
        router.wait(30)
    assert maps_torch(os.getpid())  # the check itself sees torch where it is: here, beside the model server
