"""What every reliability test checks at its end: the engine is idle and every KV block is back."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import AsyncIterator, Callable

import grpc
import uvicorn

from tests.api.conftest import CHAT_TEMPLATE, TinyServer, free_port, wait_healthy
from tests.tiny_models import build_tiny
from tokenmill.api.app import build_app
from tokenmill.api.grpc import model_server_pb2_grpc as pb_grpc
from tokenmill.api.grpc.model_server import ModelServerServicer
from tokenmill.api.server import ServeOptions, build_service
from tokenmill.async_engine import AsyncEngine
from tokenmill.backend import Backend
from tokenmill.engine import Engine, EngineConfig

__all__ = ["EngineServer", "TinyServer", "assert_drained", "model_server", "tiny_engine", "wait_for"]


def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes; its last answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def assert_drained(server: TinyServer, timeout_s: float = 5.0) -> None:
    """Within `timeout_s`: no request in the batch or the queue, no admitted client, every block free."""
    engine = server.engine
    drained = wait_for(lambda: not engine.has_unfinished() and server.service.in_flight == 0
                       and engine.block_manager.num_free_blocks == engine.num_blocks, timeout_s)
    assert drained, (f"not drained after {timeout_s} s: unfinished={engine.has_unfinished()}, "
                     f"in_flight={server.service.in_flight}, "
                     f"free blocks {engine.block_manager.num_free_blocks}/{engine.num_blocks}")


class EngineServer(TinyServer):
    """A `TinyServer` over an engine the test built (a chosen backend, a chosen KV-cache size)."""

    def __init__(self, engine: Engine, **options):  # noqa: super().__init__ would build its own engine
        self.engine = engine
        self.service, self.metrics, self.runner = build_service(ServeOptions(engine=engine.config, **options), engine)
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


def tiny_engine(kv_cache_bytes: int = 4 << 20, backend: Backend | None = None, **config) -> Engine:
    """The tiny random Llama of `TinyServer`, with its chat template, on `backend` (default: cpu)."""
    checkpoint = build_tiny("llama").checkpoint()
    checkpoint.tokenizer.chat_template = CHAT_TEMPLATE
    engine_config = EngineConfig(backend=backend.name if backend else "cpu", dtype="float32", progress=False,
                                 kv_cache_bytes=kv_cache_bytes, model_id="tiny-llama", **config)
    return Engine(engine_config, backend=backend, checkpoint=checkpoint)


@contextlib.asynccontextmanager
async def model_server(engine: Engine, servicer_type: type = ModelServerServicer,
                       interceptors: tuple = ()) -> AsyncIterator[tuple[str, ModelServerServicer]]:
    """`engine` behind the internal gRPC protocol on this event loop, ready: (its address, its servicer)."""
    runner = AsyncEngine(engine).start()
    servicer = servicer_type(engine, runner, "tiny-llama")
    servicer.ready = True
    server = grpc.aio.server(interceptors=list(interceptors))
    pb_grpc.add_ModelServerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)
        runner.stop()
