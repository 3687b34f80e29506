"""`tokenmill serve`: the launcher and router.

By default it starts one model-server process on a unix socket (TGI's launcher and shard) and serves
HTTP and gRPC in front of it; with `--model-server ADDR` (repeatable) it fronts running replicas,
local or remote, instead; with `--ray ADDRESS` it runs them as Ray actors and resizes their set
(`ray_replicas.py`). HTTP is bound at once: `/health` says 503 until a replica is warm.
`build_service` wires the same front end to an in-process engine (tests, embedding); only it imports
the engine, so that the router process imports no torch (`tests/api/test_router_imports.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from tokenmill.api.app import build_app
from tokenmill.api.autoscale import ScalingPolicy
from tokenmill.api.images import ImageLimits, ImagePrompts
from tokenmill.api.launch import start_model_server
from tokenmill.api.metrics import Metrics
from tokenmill.api.router import ReplicaRouter
from tokenmill.api.routing import RoutingPolicy
from tokenmill.api.service import GenerationService
from tokenmill.api.settings import ServerSettings
from tokenmill.config import EngineConfig
from tokenmill.errors import TokenmillError
from tokenmill.loader import load_processor, load_tokenizer

if TYPE_CHECKING:
    from tokenmill.async_engine import AsyncEngine
    from tokenmill.engine import Engine

logger = logging.getLogger(__name__)


class ModelServerExited(TokenmillError):
    """The model server this launcher started has exited; the launcher stops too, for a restart."""


@dataclass(frozen=True)
class ServeOptions:
    engine: EngineConfig
    hostname: str = "0.0.0.0"
    port: int = 3000
    grpc_port: int | None = 3001  # None: no public gRPC server
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    payload_limit: int = 2_000_000
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    model_servers: tuple[str, ...] = ()  # empty: launch one local model server
    model_server_args: tuple[str, ...] = ()  # engine flags passed to the launched model server
    routing: RoutingPolicy = RoutingPolicy()  # how a request's replica is picked among several
    ray_address: str | None = None  # run the model servers as actors on this Ray cluster (api/ray_replicas.py)
    scaling: ScalingPolicy = ScalingPolicy()  # on Ray: how many model servers, as the queues say
    ray_resources: dict | None = None  # on Ray: what each model server asks for ({"GPU": 1}, ...)
    startup_timeout_s: float = 600.0
    graceful_shutdown_s: int = 30
    watermark_gamma: float = 0.5  # TGI's --watermark-gamma: the green share of requests with `watermark`
    watermark_delta: float = 2.0  # TGI's --watermark-delta: what a green token's logit gains
    disable_grammar_support: bool = False  # TGI's --disable-grammar-support: structured output gets 422
    tool_call_parser: str = "hermes"  # vLLM's --tool-call-parser: the tool-call format of `tool_choice: auto`
    image_limits: ImageLimits = ImageLimits()  # how image URLs are read, for a vision-language model


def model_name(model_id: str | None, source: str) -> str:
    return model_id or Path(source).stem


def make_settings(options: ServeOptions, model_id: str, max_model_tokens: int, compute_type: str,
                  adapters: tuple[str, ...] = (), model_implementation: str = "tokenmill") -> ServerSettings:
    max_total = options.max_total_tokens or max_model_tokens
    return ServerSettings(
        model_id=model_id, max_input_tokens=options.max_input_tokens or max_total - 1, max_total_tokens=max_total,
        max_concurrent_requests=options.max_concurrent_requests, max_best_of=options.max_best_of,
        max_stop_sequences=options.max_stop_sequences, max_top_n_tokens=options.max_top_n_tokens,
        max_client_batch_size=options.max_client_batch_size, payload_limit=options.payload_limit,
        api_key=options.api_key, cors_allow_origin=options.cors_allow_origin, compute_type=compute_type,
        watermark_gamma=options.watermark_gamma, watermark_delta=options.watermark_delta, adapters=tuple(adapters),
        disable_grammar_support=options.disable_grammar_support, tool_call_parser=options.tool_call_parser,
        model_implementation=model_implementation,
    )


def build_service(options: ServeOptions, engine: Engine) -> tuple[GenerationService, Metrics, AsyncEngine]:
    """The front end over an in-process engine (tests use this with a tiny model)."""
    from tokenmill.async_engine import AsyncEngine  # here, not above: the router process never imports torch

    settings = make_settings(options, model_name(options.engine.model_id, engine.checkpoint.source),
                             min(engine.max_model_len, engine.kv_capacity_tokens), f"1-{engine.backend.name}",
                             engine.adapter_names, engine.model_implementation)
    metrics = Metrics()
    metrics.configure(settings.model_id, settings.max_input_tokens, settings.max_total_tokens, engine.max_model_len,
                      engine.kv_capacity_tokens, engine.config.speculate)
    runner = AsyncEngine(engine)
    runner.step_listeners.append(lambda eng, _: metrics.observe_engine(eng))
    service = GenerationService(runner, engine.tokenizer, settings, metrics)
    service.images = image_prompts(engine.checkpoint.processor, options.image_limits)
    return service, metrics, runner


def serve(options: ServeOptions, launched: tuple[str, subprocess.Popen] | None = None) -> None:
    """Serve until stopped. `launched` is a local model server already started (address, process);
    without it and without `options.model_servers`, one is started here."""
    if launched is None and not options.model_servers and not options.ray_address:
        launched = start_model_server(options.model_server_args)
    addresses, child = ((launched[0],), launched[1]) if launched else (options.model_servers, None)
    if threading.current_thread() is threading.main_thread():
        # uvicorn drains on SIGTERM, then raises the signal again for whatever handler it found: with this
        # one the launcher goes on to stop its model server and exits 0, Kubernetes' contract for a drain.
        signal.signal(signal.SIGTERM, _drained)
    try:
        asyncio.run(_run_router(options, addresses, child))
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=options.graceful_shutdown_s)
            except subprocess.TimeoutExpired:
                child.kill()


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM as a drain: new requests get 503 with Retry-After (and `/health` 503, so
    load balancers move on) while in-flight ones finish, for at most `grace_s`; then the usual shutdown.

    uvicorn alone stops listening at once, so a client arriving during the drain is refused a
    connection instead of told to retry. A second SIGTERM, or SIGINT, stops at once as uvicorn does.
    """

    def __init__(self, config: uvicorn.Config, service: GenerationService, grace_s: float):
        super().__init__(config)
        self.service = service
        self.grace_s = grace_s

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and not self.service.draining and not self.should_exit:
            self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does: see _drained
            self.service.draining = True
            asyncio.get_running_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))
            return
        super().handle_exit(sig, frame)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        logger.info("SIGTERM: draining %d in-flight request(s), new ones get 503", self.service.in_flight)
        while self.service.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.1)
        self.should_exit = True


def _drained(signum, frame) -> None:
    logger.info("drained after SIGTERM; stopping")


async def _run_router(options: ServeOptions, addresses: tuple[str, ...], child: subprocess.Popen | None) -> None:
    router = ReplicaRouter(addresses, policy=options.routing, replicas_come_later=bool(options.ray_address))
    pool = None
    if options.ray_address:
        from tokenmill.api.ray_replicas import RayReplicaPool

        pool = RayReplicaPool(router, options.scaling, options.model_server_args, options.ray_resources or {},
                              drain_timeout_s=options.graceful_shutdown_s)
    metrics = Metrics()
    router.on_health.append(metrics.observe_replicas)
    metrics.refreshers.append(functools.partial(metrics.observe_replica_batches, router))
    placeholder = make_settings(options, options.engine.model_id or "loading", 2, "loading")
    service = GenerationService(router, None, placeholder, metrics)
    grpc_address = f"{options.hostname}:{options.grpc_port}" if options.grpc_port else None
    app = build_app(service, metrics, grpc_address)
    server = DrainingServer(uvicorn.Config(app, host=options.hostname, port=options.port, log_level="info",
                                           timeout_graceful_shutdown=options.graceful_shutdown_s),
                            service, options.graceful_shutdown_s)
    serving = asyncio.create_task(server.serve())
    # A local child loads the very model of these options: read its tokenizer while it starts up.
    early_tokenizer = (asyncio.create_task(asyncio.to_thread(load_tokenizer, options.engine.model_id,
                                                             options.engine.cache_dir, options.engine.load_format))
                       if child is not None else None)
    try:
        if pool is not None:
            await pool.start(options.ray_address)
        info = await _wait_for_replica(router, child, options.startup_timeout_s, serving)
        if info is None:
            return  # stopped while waiting (a drain with nothing in flight): the signal is re-raised on return
        service.tokenizer = await (early_tokenizer or asyncio.to_thread(load_tokenizer, info.source,
                                                                        options.engine.cache_dir,
                                                                        options.engine.load_format))
        processor = await asyncio.to_thread(load_processor, info.source, options.engine.load_format)
        service.images = image_prompts(processor, options.image_limits)
        router.image_token_id = getattr(processor, "image_token_id", None)
        if processor is not None and not getattr(service.tokenizer, "chat_template", None):
            service.tokenizer.chat_template = processor.chat_template  # a VLM's template may live with its processor
        service.settings = make_settings(options, model_name(options.engine.model_id or info.model_id, info.source),
                                         min(info.max_model_len, info.kv_capacity_tokens),
                                         f"{len(router.replicas)}-{info.backend}", tuple(info.adapters),
                                         info.model_implementation or "tokenmill")
        s = service.settings
        metrics.configure(s.model_id, s.max_input_tokens, s.max_total_tokens, info.max_model_len,
                          info.kv_capacity_tokens, info.speculate)
        router.start()
        gc.freeze()  # start-up's objects live as long as the router: no full collection walks them again
        service.ready = True
        logger.info("ready: http://%s:%s, %d model server(s)", options.hostname, options.port, len(router.replicas))
        if child is None:
            await serving
            return
        exited = asyncio.create_task(_child_exit(child))
        await asyncio.wait([serving, exited], return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if child.poll() is not None and not serving.done():
            # Like TGI's launcher when a shard dies: stop serving and exit non-zero, so whatever runs this
            # launcher restarts the whole group; the model server has already failed what was in flight.
            service.ready = False
            server.should_exit = True
            await serving
            raise ModelServerExited(f"the model server exited (code {child.returncode})")
    finally:
        if early_tokenizer is not None:
            early_tokenizer.cancel()  # start-up failed before it was awaited: no orphaned task error
        server.should_exit = True
        if pool is not None:
            await pool.stop()
        await router.stop()


async def _child_exit(child: subprocess.Popen) -> None:
    while child.poll() is None:
        await asyncio.sleep(0.2)


async def _wait_for_replica(router: ReplicaRouter, child: subprocess.Popen | None, timeout_s: float,
                            serving: asyncio.Task):
    """The first replica's info; None when the HTTP server stopped first (SIGTERM before any replica was up)."""
    waiting = asyncio.create_task(router.wait_ready(timeout_s))
    while True:
        # Woken the moment the replica is ready (a start-up's first answer waits on it), else every 0.2 s to
        # look at the child.
        await asyncio.wait([waiting, serving], timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
        if waiting.done():
            return waiting.result()
        if serving.done():
            waiting.cancel()
            return None
        if child is not None and child.poll() is not None:
            waiting.cancel()
            raise RuntimeError(f"the model server exited during start-up (code {child.returncode})")


def image_prompts(processor, limits: ImageLimits) -> ImagePrompts | None:
    """What reads a vision-language model's images; None for a text-only model (images get 422)."""
    return ImagePrompts(processor, limits) if processor is not None else None


def with_engine(options: ServeOptions, **changes) -> ServeOptions:
    return dataclasses.replace(options, engine=dataclasses.replace(options.engine, **changes))
