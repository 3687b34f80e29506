"""Prometheus metrics under TGI's names (`tgi_*`) where TGI has the metric, `tokenmill_*` for the rest."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# TGI: 35 geometric buckets from 0.15 ms, x1.5.
DURATION_BUCKETS = tuple(0.00015 * 1.5**i for i in range(35))
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_count = Counter("tgi_request_count", "Requests received", registry=r)
        self.request_success = Counter("tgi_request_success", "Requests that finished", registry=r)
        self.request_failure = Counter("tgi_request_failure", "Requests that failed", ["err"], registry=r)
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting to be scheduled", registry=r)
        self.batch_size = Gauge("tgi_batch_current_size", "Sequences in the running batch", registry=r)
        self.request_duration = Histogram("tgi_request_duration", "End-to-end request time (s)",
                                          buckets=DURATION_BUCKETS, registry=r)
        self.queue_duration = Histogram("tgi_request_queue_duration", "Time in queue (s)",
                                        buckets=DURATION_BUCKETS, registry=r)
        self.inference_duration = Histogram("tgi_request_inference_duration", "Time from first step to end (s)",
                                            buckets=DURATION_BUCKETS, registry=r)
        self.time_per_token = Histogram("tgi_request_mean_time_per_token_duration", "Mean time per token (s)",
                                        buckets=DURATION_BUCKETS, registry=r)
        self.input_length = Histogram("tgi_request_input_length", "Prompt tokens", buckets=TOKEN_BUCKETS, registry=r)
        self.generated_tokens = Histogram("tgi_request_generated_tokens", "Generated tokens", buckets=TOKEN_BUCKETS,
                                          registry=r)
        self.kv_usage = Gauge("tokenmill_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r)
        self.prefix_hit_rate = Gauge("tokenmill_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.preemptions = Gauge("tokenmill_preemptions_total", "Requests preempted for recompute", registry=r)
        # engine.num_compiles: the backend's own compile count (XLA), else distinct padded step shapes.
        # Warm-up compiles them all, so a rise while serving means a request paid a compilation.
        self.compiles = Counter("tokenmill_compiles", "Compilations of the model step (shape-bucketed backends)",
                                registry=r)
        self._compiles_seen = 0
        self.replica_requests = Gauge("tokenmill_replica_requests", "Requests sent to each model server",
                                      ["replica"], registry=r)
        self.replica_healthy = Gauge("tokenmill_replica_healthy", "1 while a model server is healthy", ["replica"],
                                     registry=r)

    def observe_engine(self, engine) -> None:
        """Refresh the engine gauges (called after each step, from the engine thread)."""
        blocks = engine.block_manager
        self.queue_size.set(engine.scheduler.num_waiting)
        self.batch_size.set(engine.scheduler.num_running)
        self.kv_usage.set(blocks.usage)
        rate = engine.prefix_cache_hit_rate
        self.prefix_hit_rate.set(math.nan if rate is None else rate)  # NaN: no prefix cache to hit, not 0 %
        self.preemptions.set(engine.scheduler.num_preemptions)
        self._observe_compiles(engine.num_compiles)

    def observe_replicas(self, router) -> None:
        """Refresh the engine gauges from the model servers' reports (after each health round)."""
        infos = [r.info for r in router.replicas if r.healthy and r.info is not None]
        self.queue_size.set(sum(i.num_waiting for i in infos))
        self.batch_size.set(sum(i.num_running for i in infos))
        self.kv_usage.set(sum(i.kv_cache_usage for i in infos) / len(infos) if infos else 0.0)
        rates = [i.prefix_cache_hit_rate for i in infos if not math.isnan(i.prefix_cache_hit_rate)]
        self.prefix_hit_rate.set(sum(rates) / len(rates) if rates else (math.nan if infos else 0.0))
        self.preemptions.set(sum(i.num_preemptions for i in infos))
        self._observe_compiles(sum(i.num_compiles for i in infos))
        for replica in router.replicas:
            self.replica_requests.labels(replica=replica.address).set(replica.num_requests)
            self.replica_healthy.labels(replica=replica.address).set(1 if replica.healthy else 0)

    def _observe_compiles(self, total: int) -> None:
        # A counter only rises: a replica that restarted (its count fell) adds what it compiled since.
        self.compiles.inc(max(0, total - self._compiles_seen))
        self._compiles_seen = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
