"""`tokenmill serve`: load the model, warm it up, serve HTTP; `/health` answers 503 until warm.

For now the engine runs in the server process, on its own thread; the router / model-server split
over gRPC (TGI's launcher, router and shards) is the next step of the serving issue.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from tokenmill.api.app import build_app
from tokenmill.api.metrics import Metrics
from tokenmill.api.service import GenerationService
from tokenmill.api.settings import ServerSettings
from tokenmill.async_engine import AsyncEngine
from tokenmill.engine import Engine, EngineConfig

logger = logging.getLogger(__name__)


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


def model_name(engine_config: EngineConfig, source: str) -> str:
    return engine_config.model_id or Path(source).stem


def build_service(options: ServeOptions, engine: Engine) -> tuple[GenerationService, Metrics, AsyncEngine]:
    """The service over an already loaded engine (tests use this with a tiny model)."""
    max_total = options.max_total_tokens or min(engine.max_model_len, engine.kv_capacity_tokens)
    max_input = options.max_input_tokens or max_total - 1
    settings = ServerSettings(
        model_id=model_name(options.engine, engine.checkpoint.source), max_input_tokens=max_input,
        max_total_tokens=max_total, max_concurrent_requests=options.max_concurrent_requests,
        max_best_of=options.max_best_of, max_stop_sequences=options.max_stop_sequences,
        max_top_n_tokens=options.max_top_n_tokens, max_client_batch_size=options.max_client_batch_size,
        payload_limit=options.payload_limit, api_key=options.api_key, cors_allow_origin=options.cors_allow_origin,
        compute_type=f"1-{engine.backend.name}",
    )
    metrics = Metrics()
    runner = AsyncEngine(engine)
    runner.step_listeners.append(lambda eng, _: metrics.observe_engine(eng))
    service = GenerationService(runner, engine.tokenizer, settings, metrics)
    return service, metrics, runner


def serve(options: ServeOptions) -> None:
    engine = Engine(options.engine)
    logger.info("model loaded in %.1f s on backend %s (%s blocks of %s tokens)", engine.load_time_s,
                engine.backend.name, engine.num_blocks, engine.layout.block_size)
    service, metrics, runner = build_service(options, engine)
    grpc_address = f"{options.hostname}:{options.grpc_port}" if options.grpc_port else None
    app = build_app(service, metrics, grpc_address)

    def warm_up() -> None:
        engine.warmup()
        runner.start()
        metrics.observe_engine(engine)
        service.ready = True
        logger.info("warm: serving on http://%s:%s", options.hostname, options.port)

    threading.Thread(target=warm_up, name="tokenmill-warmup", daemon=True).start()
    uvicorn.run(app, host=options.hostname, port=options.port, log_level="info", timeout_graceful_shutdown=30)
    runner.stop()
