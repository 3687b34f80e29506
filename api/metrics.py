"""`/metrics`: TGI's metrics under TGI's exact names (`tgi_metrics.py`), vLLM's as aliases
(`vllm_metrics.py`), `tokenmill_*` for the rest; and how a client request is observed.

A client request (one HTTP generation route, one gRPC call) is a `RequestTicket`, reachable from
everything its handler awaits through a context variable: it is counted once when a handler takes it,
then once as a success or as a failure with TGI's `err` label, whichever way it ends. Its engine
requests (several with `n` or `best_of`) are observed one by one as their outputs arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tokenmill.api.disconnect import ClientDisconnected
from tokenmill.api.grpc.convert import speculation_from_pb
from tokenmill.api.errors import (ModelLoadingError, OverloadedError, ShuttingDownError, TemplateError,
                                  ToolError, UnknownModelError, UnsupportedError)
from tokenmill.api.tgi_metrics import DURATION, TgiMetrics
from tokenmill.api.vllm_metrics import FINISHED_REASONS, VllmSeries, vllm_series
from tokenmill.errors import GenerationError, ValidationError
from tokenmill.outputs import RequestOutput
from tokenmill.speculate import SpeculationStats

# The routes whose requests TGI counts (`/` only as POST: a GET is the health check).
GENERATION_ROUTES = frozenset({"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions",
                               "/invocations", "/vertex"})

_current: contextvars.ContextVar[RequestTicket | None] = contextvars.ContextVar("tokenmill_request", default=None)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()  # tokenmill_* and vLLM's names; TGI's are in `self.tgi`
        self.tgi = TgiMetrics()
        self.refreshers: list = []  # async callables a scrape awaits first (the model servers' batch samples)
        self.vllm: VllmSeries | None = None  # bound to the model's name by `configure`
        self.kv_usage = Gauge("tokenmill_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r)
        self.prefix_hit_rate = Gauge("tokenmill_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.preemptions = Gauge("tokenmill_preemptions_total", "Requests preempted for recompute", registry=r)
        self._preemptions_seen = 0
        # engine.num_compiles: the backend's own compile count (XLA), else distinct padded step shapes.
        # Warm-up compiles them all, so a rise while serving means a request paid a compilation.
        self.compiles = Counter("tokenmill_compiles", "Compilations of the model step (shape-bucketed backends)",
                                registry=r)
        self._compiles_seen = 0
        self.replica_requests = Gauge("tokenmill_replica_requests", "Requests sent to each model server",
                                      ["replica"], registry=r)
        self.replica_healthy = Gauge("tokenmill_replica_healthy", "1 while a model server is healthy", ["replica"],
                                     registry=r)
        # The replica set as it grows and shrinks (tokenmill serve --ray): its size, and who joined and left.
        self.replicas = Gauge("tokenmill_replicas", "Model servers in the router's set, draining ones included",
                              registry=r)
        self.replica_changes = Counter("tokenmill_replica_changes", "Model servers that joined the set (added) "
                                       "or left it, drained (removed) or dead (lost)", ["change"], registry=r)
        self._replica_changes_seen: dict[str, int] = {}
        self._replica_labels: set[str] = set()
        # Prefix-aware routing (api/router.py): hits over lookups is its hit rate.
        self.router_prefix_lookups = Counter("tokenmill_router_prefix_lookups", "Requests the router routed by "
                                             "their prompt's prefix", registry=r)
        self.router_prefix_hits = Counter("tokenmill_router_prefix_hits", "Requests the router sent to the "
                                          "replica that served their prefix before", registry=r)
        self._router_prefix_seen = (0, 0)
        # TGI has no time-to-first-token metric (its dashboard adds queue and prefill times): this one has
        # its duration buckets; `vllm:time_to_first_token_seconds` has vLLM's.
        # Speculative decoding: tokens a decoding sequence gets per forward (1 without it), since the start.
        self.tokens_per_forward = Gauge("tokenmill_decode_tokens_per_forward", "Tokens a decoding sequence gets "
                                        "from one forward (above 1: accepted draft tokens)", registry=r)
        self._speculation_seen = SpeculationStats()
        self.ttft = Histogram("tokenmill_time_to_first_token_seconds", "Time from a request's arrival to its first "
                              "token", buckets=DURATION, registry=r)
        # vLLM's inter-token buckets start at 10 ms, coarser than a fast decode: this one has TGI's durations.
        self.inter_token = Histogram("tokenmill_inter_token_latency_seconds", "Time between a request's tokens",
                                     buckets=DURATION, registry=r)

    def configure(self, model_name: str, max_input_tokens: int, max_total_tokens: int, max_model_len: int,
                  kv_capacity_tokens: int, speculate: int = 0) -> None:
        """What the bucket layouts and labels depend on, once the model is known."""
        self.tgi.configure(max_input_tokens, max_total_tokens, kv_capacity_tokens, speculate)
        if self.vllm is None:
            self.vllm = vllm_series(self.registry, model_name, max_model_len)

    def observe_engine(self, engine) -> None:
        """Refresh the engine gauges and record its latest step (after each step, on the engine thread)."""
        blocks = engine.block_manager
        rate = engine.prefix_cache_hit_rate
        self._set_gauges(engine.scheduler.num_waiting, engine.scheduler.num_running, blocks.usage,
                         math.nan if rate is None else rate)  # NaN: no prefix cache to hit, not 0 %
        self._observe_preemptions(engine.scheduler.num_preemptions)
        self._observe_compiles(engine.num_compiles)
        self._observe_speculation(engine.speculation)
        self.tgi.batch.observe_engine(engine)

    def observe_replicas(self, router) -> None:
        """Refresh the engine gauges from the model servers' reports (after each health round)."""
        infos = [r.info for r in router.replicas if r.healthy and r.info is not None]
        rates = [i.prefix_cache_hit_rate for i in infos if not math.isnan(i.prefix_cache_hit_rate)]
        self._set_gauges(sum(i.num_waiting for i in infos), sum(i.num_running for i in infos),
                         sum(i.kv_cache_usage for i in infos) / len(infos) if infos else 0.0,
                         sum(rates) / len(rates) if rates else (math.nan if infos else 0.0))
        self._observe_preemptions(sum(i.num_preemptions for i in infos))
        self._observe_compiles(sum(i.num_compiles for i in infos))
        self._observe_speculation(sum((speculation_from_pb(i.speculation) for i in infos), SpeculationStats()))
        if infos:
            self.tgi.max_total_tokens.set(sum(i.kv_capacity_tokens for i in infos))
        for replica in router.replicas:
            self.replica_requests.labels(replica=replica.address).set(replica.num_requests)
            self.replica_healthy.labels(replica=replica.address).set(1 if replica.healthy and not replica.draining
                                                                     else 0)
        self._observe_replica_set(router)
        lookups, hits = self._router_prefix_seen
        self.router_prefix_lookups.inc(router.prefix_lookups - lookups)
        self.router_prefix_hits.inc(router.prefix_hits - hits)
        self._router_prefix_seen = (router.prefix_lookups, router.prefix_hits)

    def _observe_replica_set(self, router) -> None:
        """The set's size and changes; a replica that left drops out of the per-replica series."""
        self.replicas.set(len(router.replicas))
        for change, total in router.changes.items():
            self.replica_changes.labels(change=change).inc(total - self._replica_changes_seen.get(change, 0))
            self._replica_changes_seen[change] = total
        present = {r.address for r in router.replicas}
        for gone in self._replica_labels - present:
            self.replica_requests.remove(gone)
            self.replica_healthy.remove(gone)
        self._replica_labels = present

    def _set_gauges(self, waiting: int, running: int, kv_usage: float, prefix_hit_rate: float) -> None:
        self.tgi.queue_size.set(waiting)
        self.tgi.batch_size.set(running)
        self.kv_usage.set(kv_usage)
        self.prefix_hit_rate.set(prefix_hit_rate)
        if self.vllm is not None:
            self.vllm.waiting.set(waiting)
            self.vllm.running.set(running)
            self.vllm.kv_cache_usage.set(kv_usage)

    def _observe_preemptions(self, total: int) -> None:
        self.preemptions.set(total)
        if self.vllm is not None:
            self.vllm.preemptions.inc(max(0, total - self._preemptions_seen))
        self._preemptions_seen = total

    def _observe_compiles(self, total: int) -> None:
        # A counter only rises: a replica that restarted (its count fell) adds what it compiled since.
        self.compiles.inc(max(0, total - self._compiles_seen))
        self._compiles_seen = total

    def _observe_speculation(self, stats: SpeculationStats) -> None:
        """vLLM's spec_decode counters rise by what the engine's totals rose since the last look."""
        self.tokens_per_forward.set(stats.tokens_per_forward)
        seen, self._speculation_seen = self._speculation_seen, stats.copy()
        if self.vllm is None:
            return
        self.vllm.spec_drafts.inc(max(0, stats.num_drafts - seen.num_drafts))
        self.vllm.spec_draft_tokens.inc(max(0, stats.num_draft_tokens - seen.num_draft_tokens))
        self.vllm.spec_accepted_tokens.inc(max(0, stats.num_accepted_tokens - seen.num_accepted_tokens))
        before = seen.accepted_per_position + [0] * len(stats.accepted_per_position)
        for position, total in enumerate(stats.accepted_per_position):
            self.vllm.accepted_at(position).inc(max(0, total - before[position]))

    @contextlib.contextmanager
    def request(self):
        """Observe one client request while it runs: everything awaited inside sees its ticket."""
        ticket = RequestTicket(self)
        token = _current.set(ticket)
        try:
            yield ticket
        except BaseException as exc:
            ticket.fail(exc)
            raise
        finally:
            with contextlib.suppress(ValueError):  # a generator finalized from another context
                _current.reset(token)
            ticket.finish()

    def request_failed(self, exc: BaseException) -> None:
        request_failed(exc)

    def engine_request(self, num_prompt_tokens: int, max_new_tokens: int) -> EngineRequest:
        return EngineRequest(self, num_prompt_tokens, max_new_tokens)

    async def observe_replica_batches(self, router) -> None:
        """The model servers' batch samples, fetched for a scrape (`refreshers`)."""
        self.tgi.observe_replica_batches(await router.batch_metrics())

    async def refresh(self) -> None:
        """What a scrape needs fresh before `render`."""
        for refresher in self.refreshers:
            await refresher()

    def render(self) -> bytes:
        return self.tgi.exposition().encode() + generate_latest(self.registry)


def failure_label(exc: BaseException) -> str:
    """TGI's `err` label for a request that ended with `exc` (infer/mod.rs, backends/v3/src/backend.rs)."""
    if isinstance(exc, (ValidationError, UnsupportedError, ToolError, UnknownModelError)):  # refused for what it asks
        return "validation"
    if isinstance(exc, TemplateError):
        return "template"
    # TGI has no label for a server that is loading or draining: like overload, it refuses work it can't take now.
    if isinstance(exc, (OverloadedError, ModelLoadingError, ShuttingDownError)):
        return "overloaded"
    if isinstance(exc, GenerationError):
        return "generation"
    if isinstance(exc, (ClientDisconnected, asyncio.CancelledError, GeneratorExit)):
        return "dropped"
    return "incomplete"


def request_taken() -> None:
    """A handler has taken the current request (TGI counts it in `tgi_request_count` here)."""
    ticket = _current.get()
    if ticket is not None:
        ticket.take()


def request_failed(exc: BaseException) -> None:
    """The current request failed with `exc`, already answered or about to be (an error event in a stream)."""
    ticket = _current.get()
    if ticket is not None:
        ticket.fail(exc)


class RequestTicket:
    """One client request in TGI's counters: counted once taken, then exactly one success or failure."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.started = time.monotonic()
        self.taken = False
        self.outcome: str | None = None  # "success", or the failure's `err` label
        self.submitted = 0  # engine requests started, and of those not finished yet
        self.open = 0

    def take(self) -> None:
        if not self.taken:
            self.taken = True
            self.metrics.tgi.request_count.inc()

    def fail(self, exc: BaseException) -> None:
        """Count the failure, if this request was taken (a body that never reached a handler is not counted,
        as in TGI) and nothing was counted for it yet."""
        if self.taken and self.outcome is None:
            self.outcome = failure_label(exc)
            self.metrics.tgi.request_failure.labels(err=self.outcome).inc()

    def finish(self) -> None:
        """The response is out: a success if every engine request finished, else the client left first."""
        if not self.taken or self.outcome is not None:
            return
        if self.submitted and not self.open:
            self.outcome = "success"
            self.metrics.tgi.request_success.inc()
        else:
            self.fail(ClientDisconnected())


class EngineRequest:
    """One engine request's outputs, observed as they arrive: TGI's request histograms, vLLM's."""

    def __init__(self, metrics: Metrics, num_prompt_tokens: int, max_new_tokens: int):
        self.metrics = metrics
        self.ticket = _current.get()
        self.submitted = time.monotonic()
        self.started = self.ticket.started if self.ticket else self.submitted  # when the client's request came
        self.max_new_tokens = max_new_tokens
        self.last_token: float | None = None
        if self.ticket is not None:
            self.ticket.submitted += 1
            self.ticket.open += 1
        tgi = metrics.tgi
        if tgi.input_length is not None:  # TGI records these at validation, whatever happens next
            tgi.input_length.observe(num_prompt_tokens)
            tgi.max_new_tokens.observe(max_new_tokens)

    def output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        vllm = self.metrics.vllm
        if out.new_tokens:
            if self.last_token is None:
                self.metrics.ttft.observe(now - self.started)
                if vllm is not None:
                    vllm.ttft.observe(now - self.started)
                    vllm.prompt_tokens.inc(out.num_prompt_tokens)
                    vllm.prefix_queries.inc(out.num_prompt_tokens)
                    vllm.prefix_hits.inc(out.num_cached_tokens)
            else:
                gap = (now - self.last_token) / len(out.new_tokens)
                self.metrics.inter_token.observe(gap)
                if vllm is not None:
                    vllm.inter_token.observe(gap)
            self.last_token = now
            self.metrics.tgi.skipped_tokens.observe(len(out.new_tokens) - 1)
            if vllm is not None:
                vllm.generation_tokens.inc(len(out.new_tokens))
        if out.finished:
            self._finished(out, now)

    def _finished(self, out: RequestOutput, now: float) -> None:
        queue, inference = out.queue_time_s or 0.0, out.inference_time_s or 0.0
        prefill, generated = out.prefill_time_s or 0.0, out.num_generated_tokens
        tgi = self.metrics.tgi
        tgi.request_duration.observe(now - self.started)
        tgi.validation_duration.observe(self.submitted - self.started)
        tgi.queue_duration.observe(queue)
        tgi.inference_duration.observe(inference)
        tgi.time_per_token.observe(inference / max(1, generated))
        if tgi.generated_tokens is not None:
            tgi.generated_tokens.observe(generated)
        vllm = self.metrics.vllm
        if vllm is not None:
            vllm.e2e.observe(now - self.started)
            vllm.queue.observe(queue)
            vllm.inference.observe(inference)
            vllm.prefill.observe(prefill)
            vllm.decode.observe(max(0.0, inference - prefill))
            vllm.request_prompt_tokens.observe(out.num_prompt_tokens)
            vllm.request_generation_tokens.observe(generated)
            vllm.max_tokens.observe(self.max_new_tokens)
            vllm.success[FINISHED_REASONS.get(out.finish_reason or "", "stop")].inc()
        if self.ticket is not None:
            self.ticket.open -= 1


class ObservedRequests:
    """ASGI middleware: each POST to a generation route is one `RequestTicket`, held until its response
    (a stream included) is sent. It sits outside the other middleware, whose tasks inherit the ticket."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_ROUTES:
            return await self.app(scope, receive, send)
        with self.metrics.request():
            await self.app(scope, receive, send)
