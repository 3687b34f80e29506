"""Live servers for the API tests: a tiny model in-process, and `tokenmill serve` on the embedded model."""

from __future__ import annotations

import asyncio
import os
import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from tests.tiny_models import build_tiny
from tokenmill.api.app import build_app
from tokenmill.api.grpc.model_server import run_model_server
from tokenmill.api.server import ServeOptions, build_service
from tokenmill.cli import model_server_setup
from tokenmill.engine import Engine, EngineConfig
from tokenmill.conformance.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def wait_healthy(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy in {timeout_s} s")


class TinyServer:
    """uvicorn on a thread, serving a tiny random Llama; `engine` is reachable for assertions."""

    def __init__(self, tokenizer=None, tiny=None, chat_template=CHAT_TEMPLATE, speculate: int = 0, **options):
        checkpoint = (tiny or build_tiny("llama")).checkpoint()  # `tiny`: e.g. one taught an answer
        if tokenizer is not None:  # e.g. `char_tokenizer()`, for structured output
            checkpoint.tokenizer = tokenizer
        checkpoint.tokenizer.chat_template = chat_template
        engine_config = EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=4 << 20, progress=False,
                                     model_id="tiny-llama", speculate=speculate)
        self.engine = Engine(engine_config, checkpoint=checkpoint)
        serve_options = ServeOptions(engine=engine_config, **options)
        self.service, self.metrics, self.runner = build_service(serve_options, self.engine)
        self.runner.start()
        self.service.ready = True
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.grpc_address = f"127.0.0.1:{free_port()}"
        app = build_app(self.service, self.metrics, self.grpc_address)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.url, 30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.runner.stop()


class ThreadedModelServer:
    """`tokenmill model-server` on a thread of this process, stopped by an event instead of a signal."""

    def __init__(self, argv: list[str]):
        self.listening = threading.Event()
        self.address = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        config, model_id, _ = model_server_setup(["--listen", "127.0.0.1:0", *argv])

        def on_listening(address: str) -> None:
            self.address = address
            self.listening.set()

        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await run_model_server(config, "127.0.0.1:0", model_id, grace_s=5, stop=self._stop,
                                   on_listening=on_listening)

        self.thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self.thread.start()
        assert self.listening.wait(120), "the model server did not start listening"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def tiny_server():
    server = TinyServer(max_concurrent_requests=4, payload_limit=20_000)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def served_smollm2():
    """`tokenmill serve` as `make serve` runs it, on the embedded model, in a subprocess."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), "KV_CACHE_BYTES": str(256 << 20)}
    process = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--hostname", "127.0.0.1"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 180, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def run_client(tmp_path_factory):
    """Run client code in a fresh process, with stubs generated there from the repo's .proto file.

    A separate process, as a real client is: the server's own generated modules hold the same
    message names in this process's descriptor pool.
    """
    out = tmp_path_factory.mktemp("client")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'api' / 'grpc'}", f"--python_out={out}",
                    f"--grpc_python_out={out}", "generate.proto"], check=True)

    def run(address: str, body: str) -> dict:
        script = out / "client.py"
        script.write_text("import json, sys, grpc\nimport generate_pb2 as pb, generate_pb2_grpc as pb_grpc\n"
                          f"channel = grpc.insecure_channel({address!r})\nstub = pb_grpc.TextGenerationStub(channel)\n"
                          + textwrap.dedent(body))
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=out)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return run
