"""`tokenmill model-server`: one engine replica behind the internal gRPC protocol (TGI's shard).

It loads the model, warms up (health NOT_SERVING until then), and serves `ModelServer` on a unix
socket or a TCP address. SIGTERM stops it gracefully: in-flight streams get the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from tokenmill.api.grpc import model_server_pb2 as pb
from tokenmill.api.grpc import model_server_pb2_grpc as pb_grpc
from tokenmill.api.grpc.convert import output_to_pb, params_from_pb
from tokenmill.api.tracing import extract_context, tracer
from tokenmill.async_engine import AsyncEngine, GenerationError
from tokenmill.engine import Engine, EngineConfig
from tokenmill.errors import ValidationError

logger = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelServer"].full_name


class ModelServerServicer(pb_grpc.ModelServerServicer):
    def __init__(self, engine: Engine, runner: AsyncEngine, model_id: str):
        self.engine = engine
        self.runner = runner
        self.model_id = model_id
        self.ready = False

    async def Generate(self, request, context):
        parent = extract_context(dict(context.invocation_metadata() or ()))
        with tracer().start_as_current_span("model_server.generate", context=parent) as span:
            span.set_attribute("tokenmill.request_id", request.request_id)
            span.set_attribute("tokenmill.prompt_tokens", len(request.prompt_token_ids))
            try:
                params = params_from_pb(request.params)
                async for out in self.runner.generate(request.request_id, list(request.prompt_token_ids), params):
                    if out.finished:
                        _record_phases(span, out)
                    yield output_to_pb(out)
            except ValidationError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except GenerationError as exc:
                await context.abort(grpc.StatusCode.INTERNAL, str(exc))

    async def Info(self, request, context):
        engine = self.engine
        blocks = engine.block_manager
        return pb.InfoResponse(
            model_id=self.model_id, source=engine.checkpoint.source, max_model_len=engine.max_model_len,
            kv_capacity_tokens=engine.kv_capacity_tokens, backend=engine.backend.name,
            num_running=engine.scheduler.num_running, num_waiting=engine.scheduler.num_waiting,
            kv_cache_usage=blocks.usage,
            prefix_cache_hit_rate=blocks.prefix_hits / blocks.prefix_queries if blocks.prefix_queries else 0.0,
            num_preemptions=engine.scheduler.num_preemptions, ready=self.ready,
        )


def _record_phases(span, out) -> None:
    """Queue, prefill and decode as child spans, placed with the engine's own timings."""
    import time

    end_ns = time.time_ns()
    inference_ns = int((out.inference_time_s or 0.0) * 1e9)
    prefill_ns = int((out.prefill_time_s or 0.0) * 1e9)
    start_ns = end_ns - inference_ns
    phases = (("queue", start_ns - int((out.queue_time_s or 0.0) * 1e9), start_ns),
              ("prefill", start_ns, start_ns + prefill_ns),
              ("decode", start_ns + prefill_ns, end_ns))
    for name, begin, finish in phases:
        tracer().start_span(name, start_time=begin).end(end_time=finish)
    span.set_attribute("tokenmill.generated_tokens", out.num_generated_tokens)


async def _stop_when_orphaned(parent_pid: int, stop: asyncio.Event) -> None:
    """A model server launched by `tokenmill serve` ends with its launcher, however the launcher ended."""
    import os

    while os.getppid() == parent_pid:
        await asyncio.sleep(1.0)
    logger.warning("the launcher (pid %s) is gone; stopping", parent_pid)
    stop.set()


async def run_model_server(config: EngineConfig, listen: str, model_id: str, grace_s: float = 30.0,
                           parent_pid: int | None = None) -> None:
    runner = AsyncEngine(build=lambda: Engine(config)).start()  # all tensor work on the engine thread
    engine = await asyncio.wrap_future(runner.built)
    servicer = ModelServerServicer(engine, runner, model_id)
    server = grpc.aio.server()
    pb_grpc.add_ModelServerServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if server.add_insecure_port(listen) == 0 and not listen.startswith("unix:"):
        raise RuntimeError(f"cannot listen on {listen}")
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    logger.info("model server listening on %s, warming up", listen)
    await runner.call(engine.warmup)
    servicer.ready = True
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("model server ready on %s", listen)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    orphan_watch = asyncio.create_task(_stop_when_orphaned(parent_pid, stop)) if parent_pid else None
    await stop.wait()
    if orphan_watch:
        orphan_watch.cancel()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace_s)
    runner.stop()
