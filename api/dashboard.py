"""`/dashboard`: a live page of the server's state, updated every second, with no build step.

`/dashboard/data` is a small JSON document computed from the objects `/metrics` renders: the batch and
queue gauges, KV-cache usage, the prefix-cache hit rate, output tokens per second (vLLM's generation
token counter), TTFT and inter-token latency percentiles over the last few seconds (from their
histograms, as Prometheus' `histogram_quantile` over a rate would give them), and each replica's load
and health. A sampler keeps one point a second for the last two minutes, so a page opened late draws
its plots at once. The page (`static/dashboard.html`, `static/dashboard.js`) polls the document and
draws on <canvas>: nothing loads from outside the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import Counter, Gauge, Histogram

from tokenmill.api.metrics import Metrics
from tokenmill.api.router import ReplicaRouter
from tokenmill.api.service import GenerationService

INTERVAL_S = 1.0
HISTORY_POINTS = 120  # two minutes of points
WINDOW_POINTS = 10  # latency percentiles cover the tokens of the last 10 samples
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
STATIC = Path(__file__).parent / "static"

router = APIRouter()


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The `q` quantile of cumulative `(upper bound, count)` buckets, linear within a bucket as Prometheus
    interpolates; None without observations. A quantile past the last finite bound is that bound."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below) if count > below else lower
        lower, below = bound, count
    return lower


def _buckets(histogram: Histogram) -> list[tuple[float, float]]:
    return [(float(s.labels["le"]), s.value) for s in histogram.collect()[0].samples if s.name.endswith("_bucket")]


def _value(metric: Gauge | Counter) -> float:
    return next(s.value for s in metric.collect()[0].samples if not s.name.endswith("_created"))


def _finite(value: float | None) -> float | None:
    """JSON has no NaN: a value that is not a number (no prefix cache to hit) is null."""
    return None if value is None or math.isnan(value) else value


class DashboardHistory:
    """The dashboard's points, one a second, from the service's metrics and its replicas."""

    def __init__(self, service: GenerationService, metrics: Metrics):
        self.service = service
        self.metrics = metrics
        self.points: deque[dict] = deque(maxlen=HISTORY_POINTS)
        # Cumulative counts as they were at each of the last samples: a window's figures are differences.
        self._seen: deque[tuple[float, float, list, list]] = deque(maxlen=WINDOW_POINTS + 1)
        self._replicas: list[dict] | None = None  # as of the latest point, so the table agrees with the plots

    def sample(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        m = self.metrics
        tokens = _value(m.vllm.generation_tokens) if m.vllm is not None else 0.0
        self._seen.append((now, tokens, _buckets(m.ttft), _buckets(m.inter_token)))
        (then, tokens_then, ttft_then, itl_then), latest = self._seen[0], self._seen[-1]
        last_t, last_tokens = self._seen[-2][:2] if len(self._seen) > 1 else (now, tokens)
        replicas = self._replicas = self.replicas()
        point = {
            "t": now,
            "running": _value(m.tgi.batch_size),
            "waiting": _value(m.tgi.queue_size),
            "kv_cache_usage": _value(m.kv_usage),
            "prefix_cache_hit_rate": _finite(_value(m.prefix_hit_rate)),
            "output_tokens_per_s": (tokens - last_tokens) / (now - last_t) if now > last_t else 0.0,
            "ttft_s": _percentiles(ttft_then, latest[2]),
            "inter_token_s": _percentiles(itl_then, latest[3]),
            "load": {r["address"]: r["in_flight"] for r in replicas},
        }
        self.points.append(point)
        return point

    def replicas(self) -> list[dict]:
        """Each model server's load and health; in-process, the one engine."""
        engine, m = self.service.engine, self.metrics
        if not isinstance(engine, ReplicaRouter):
            return [{"address": "in-process", "healthy": self.service.ready and not self.service.draining,
                     "in_flight": self.service.in_flight, "running": _value(m.tgi.batch_size),
                     "waiting": _value(m.tgi.queue_size), "kv_cache_usage": _value(m.kv_usage)}]
        return [{"address": r.address, "healthy": r.healthy, "draining": r.draining, "in_flight": r.in_flight,
                 "running": r.info.num_running if r.info else None,
                 "waiting": r.info.num_waiting if r.info else None,
                 "kv_cache_usage": r.info.kv_cache_usage if r.info else None,
                 "requests": r.num_requests, "failures": r.num_failures} for r in engine.replicas]

    def data(self) -> dict:
        engine = self.service.engine
        changes = dict(engine.changes) if isinstance(engine, ReplicaRouter) else {}
        return {"model": self.service.settings.model_id, "interval_s": INTERVAL_S,
                "window_s": INTERVAL_S * WINDOW_POINTS, "points": list(self.points),
                "replicas": self.replicas() if self._replicas is None else self._replicas,
                "replica_changes": changes}

    @contextlib.asynccontextmanager
    async def sampling(self):
        """Take a point a second while the app runs."""
        async def every_second() -> None:
            while True:
                self.sample()
                await asyncio.sleep(INTERVAL_S)

        task = asyncio.create_task(every_second())
        try:
            yield
        finally:
            task.cancel()


def _percentiles(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> dict:
    window = [(bound, count - then) for (bound, count), (_, then) in zip(after, before)]
    return {name: histogram_quantile(q, window) for name, q in QUANTILES.items()}


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html")


@router.get("/dashboard/dashboard.js", include_in_schema=False)
async def dashboard_script() -> FileResponse:
    return FileResponse(STATIC / "dashboard.js", media_type="text/javascript")


@router.get("/dashboard/data", include_in_schema=False)
async def dashboard_data(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.dashboard.data())
