"""`tokenmill model-server`: one engine replica behind the internal gRPC protocol (TGI's shard).

It loads the model, warms up (health NOT_SERVING until then), and serves `ModelServer` on a unix
socket or a TCP address. SIGTERM stops it gracefully: in-flight streams get the grace period.

With `num_shard` > 1 it is tensor-parallel rank 0 (`tokenmill.shard`): it starts this machine's other
ranks, and if any rank dies it fails every in-flight stream with a message naming the rank, turns
NOT_SERVING, kills the other ranks and raises `ShardFailure`, for the process to exit non-zero.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import signal
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from tokenmill.api.grpc import model_server_pb2 as pb
from tokenmill.api.grpc import model_server_pb2_grpc as pb_grpc
from tokenmill.api.grpc.convert import images_from_pb, output_to_pb, params_from_pb, speculation_to_pb
from tokenmill.api.tgi_metrics import BatchMetrics
from tokenmill.api.tracing import extract_context, tracer
from tokenmill.async_engine import AsyncEngine
from tokenmill.engine import Engine, EngineConfig
from tokenmill.errors import GenerationError, ValidationError
from tokenmill.shard import RankProcesses, ShardFailure, bind_cpus, lead, stop_followers

logger = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelServer"].full_name


class ModelServerServicer(pb_grpc.ModelServerServicer):
    def __init__(self, engine: Engine, runner: AsyncEngine, model_id: str):
        self.engine = engine
        self.runner = runner
        self.model_id = model_id
        self.ready = False
        self.failure: str | None = None  # why this replica can serve no more (a tensor-parallel rank died)
        self._calls: set[asyncio.Task] = set()
        self.batch_metrics = BatchMetrics()  # the engine's steps, for the router's /metrics (sent with Info, if asked)
        runner.step_listeners.append(lambda eng, _: self.batch_metrics.observe_engine(eng))

    def fail(self, message: str) -> None:
        """End every in-flight stream with `message` now, whatever the engine thread is blocked in."""
        self.failure = message
        self.ready = False
        for call in self._calls:
            call.cancel()

    async def Generate(self, request, context):
        if self.failure is not None:
            await context.abort(grpc.StatusCode.INTERNAL, self.failure)
        parent = extract_context(dict(context.invocation_metadata() or ()))
        call = asyncio.current_task()
        self._calls.add(call)
        with tracer().start_as_current_span("model_server.generate", context=parent) as span:
            span.set_attribute("tokenmill.request_id", request.request_id)
            span.set_attribute("tokenmill.prompt_tokens", len(request.prompt_token_ids))
            try:
                params = params_from_pb(request.params)
                adapter = request.adapter if request.HasField("adapter") else None
                async for out in self.runner.generate(request.request_id, list(request.prompt_token_ids), params,
                                                      adapter, images_from_pb(request.images)):
                    if out.finished:
                        _record_phases(span, out)
                    yield output_to_pb(out)
            except ValidationError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except GenerationError as exc:
                await context.abort(grpc.StatusCode.INTERNAL, str(exc))
            except asyncio.CancelledError:
                if self.failure is None:
                    raise
                await context.abort(grpc.StatusCode.INTERNAL, f"Request failed during generation: {self.failure}")
            finally:
                self._calls.discard(call)

    async def Abort(self, request, context):
        self.runner.abort(request.request_id)
        return pb.AbortResponse()

    async def Info(self, request, context):
        engine = self.engine
        blocks = engine.block_manager
        return pb.InfoResponse(
            model_id=self.model_id, source=engine.checkpoint.source, max_model_len=engine.max_model_len,
            kv_capacity_tokens=engine.kv_capacity_tokens, backend=engine.backend.name,
            num_running=engine.scheduler.num_running, num_waiting=engine.scheduler.num_waiting,
            kv_cache_usage=blocks.usage,
            # NaN where the backend's model owns its cache: prefix caching is unavailable, not at 0 %.
            prefix_cache_hit_rate=math.nan if engine.prefix_cache_hit_rate is None else engine.prefix_cache_hit_rate,
            num_preemptions=engine.scheduler.num_preemptions, num_compiles=engine.num_compiles,
            ready=self.ready, adapters=engine.adapter_names,
            batch_metrics=self.batch_metrics.snapshot() if request.with_batch_metrics else "",
            model_implementation=engine.model_implementation,
            speculate=engine.config.speculate, speculation=speculation_to_pb(engine.speculation),
            prefix_cache_block_size=blocks.block_size if engine.prefix_caching == "enabled" else 0,
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
                           parent_pid: int | None = None, stop: asyncio.Event | None = None,
                           on_listening: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, or until `stop` is set where one is given (a thread that is not the
    main one, such as a Ray actor's, cannot take signals). `on_listening` receives the address the server
    listens on, the port filled in when `listen` asked for port 0, before warm-up."""
    if config.cpu_bind:  # before any thread starts: the engine thread and torch's pool inherit the binding
        bind_cpus(config.cpu_bind[config.local_rank])
    loop = asyncio.get_running_loop()
    failure: asyncio.Future[str] = loop.create_future()
    processes, shard = None, None
    if config.num_shard > 1:
        processes = RankProcesses(config)
        processes.on_failure.append(
            lambda message: loop.call_soon_threadsafe(lambda: failure.done() or failure.set_result(message)))

    def build() -> Engine:
        nonlocal shard
        if processes is None:
            return Engine(config)
        engine, shard = lead(config, processes)
        return engine

    runner = AsyncEngine(build=build).start()  # all tensor work on the engine thread
    try:
        engine = await _first_of(asyncio.wrap_future(runner.built), failure)
    except BaseException:
        if processes is not None:
            processes.kill()
        raise
    servicer = ModelServerServicer(engine, runner, model_id)
    server = grpc.aio.server()
    pb_grpc.add_ModelServerServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(listen)
    if port == 0 and not listen.startswith("unix:"):
        raise RuntimeError(f"cannot listen on {listen}")
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    if on_listening is not None:
        on_listening(listen if listen.startswith("unix:") else f"{listen.rsplit(':', 1)[0]}:{port}")
    logger.info("model server listening on %s, warming up", listen)
    await _first_of(runner.call(engine.warmup), failure)
    # What start-up built (the model's modules, the tokenizer: ~300k objects) lives as long as the process; out
    # of the collector's sight, a full collection takes 0 instead of ~70 ms in the middle of a step.
    gc.freeze()
    servicer.ready = True
    await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
    logger.info("model server ready on %s", listen)

    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    failure.add_done_callback(lambda _: stop.set())
    orphan_watch = asyncio.create_task(_stop_when_orphaned(parent_pid, stop)) if parent_pid else None
    await stop.wait()
    if orphan_watch:
        orphan_watch.cancel()
    if failure.done():
        servicer.fail(failure.result())
        await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(2.0)  # long enough for the aborted streams' status to reach the router
        processes.kill()
        raise ShardFailure(failure.result())
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace_s)
    runner.stop()
    if shard is not None:
        stop_followers(shard, processes)


async def _set_health(health: health_aio.HealthServicer, status) -> None:
    for name in ("", SERVICE_NAME):
        await health.set(name, status)


async def _first_of(work: asyncio.Future, failure: asyncio.Future):
    """`work`'s result, unless a rank fails first (start-up and warm-up wait on the other ranks)."""
    work = asyncio.ensure_future(work)
    await asyncio.wait([work, failure], return_when=asyncio.FIRST_COMPLETED)
    if work.done():
        return work.result()
    raise ShardFailure(failure.result())
