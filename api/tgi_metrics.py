"""TGI's Prometheus metrics under TGI's exact names, types and bucket layouts, and their exposition.

TGI's router (metrics-exporter-prometheus) writes a counter under its own name, `tgi_request_count 3`,
with no `*_created` series; TGI's Grafana dashboard and the alerts people write from it query those
names. prometheus_client writes the same counter as `tgi_request_count_total` plus
`tgi_request_count_created`. So the values live in prometheus_client's objects (thread-safe, with
its histogram buckets) and this module writes their families itself: a counter keeps TYPE `counter`
under its bare name, and `*_created` samples are left out. (An UNTYPED family would keep the name
too, but TGI declares these as counters, and so do dashboards' metadata hints.)

Request metrics live in `TgiMetrics`; the batch metrics come from engine steps (`BatchMetrics`), in
this process or, behind `tokenmill serve`, from each model server as a snapshot of its samples.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from tokenmill.outputs import StepStats


def duration_buckets() -> tuple[float, ...]:
    """Every TGI metric named `*duration`: 35 geometric buckets, 0.1 ms x 1.5 first (router/src/server.rs)."""
    buckets, value = [], 0.0001
    for _ in range(35):
        value *= 1.5  # step by step as TGI does, so the bounds are the same floats
        buckets.append(value)
    return tuple(buckets)


def linear_buckets(maximum: int) -> tuple[float, ...]:
    """TGI's token-count histograms: 100 even buckets up to `maximum` (max input or total tokens)."""
    return tuple(maximum / 100.0 * (i + 1) for i in range(100))


DURATION = duration_buckets()
BATCH_SIZE = tuple(float(i + 1) for i in range(1024))  # tgi_batch_next_size


def skipped_buckets(speculate: int) -> tuple[float, ...]:
    """`tgi_request_skipped_tokens`: one bucket per count a step can skip, 0 to --speculate. TGI's own bucket
    config (the same) is commented out, so its exporter renders a summary; its dashboard queries
    `tgi_request_skipped_tokens_bucket`, which a histogram answers."""
    return tuple(float(i) for i in range(speculate + 1))


METHODS = ("prefill", "decode")


class TgiMetrics:
    """The request-level families of TGI's router, and the gauges it keeps of the queue and batch."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.request_count = Counter("tgi_request_count", "Total number of requests", registry=r)
        self.request_success = Counter("tgi_request_success", "Number of successful requests", registry=r)
        self.request_failure = Counter("tgi_request_failure", "Number of failed requests, by error", ["err"],
                                       registry=r)
        self.request_duration = Histogram("tgi_request_duration", "Total time spent processing the request",
                                          buckets=DURATION, registry=r)
        self.validation_duration = Histogram("tgi_request_validation_duration", "Time spent validating the request",
                                             buckets=DURATION, registry=r)
        self.queue_duration = Histogram("tgi_request_queue_duration", "Time spent in the queue per request",
                                        buckets=DURATION, registry=r)
        self.inference_duration = Histogram("tgi_request_inference_duration", "Request inference duration",
                                            buckets=DURATION, registry=r)
        self.time_per_token = Histogram("tgi_request_mean_time_per_token_duration", "Mean time per token per request",
                                        buckets=DURATION, registry=r)
        # Observed per request and step, as TGI does: the tokens beyond the first that the step gave it.
        self.skipped_tokens = self._skipped_tokens(0)
        self.queue_size = Gauge("tgi_queue_size", "Current queue size", registry=r)
        self.batch_size = Gauge("tgi_batch_current_size", "Current batch size", registry=r)
        self.max_total_tokens = Gauge("tgi_batch_max_total_tokens", "Maximum amount of tokens in total.", registry=r)
        # Their buckets follow --max-input-tokens / --max-total-tokens: made by `configure`.
        self.input_length: Histogram | None = None
        self.generated_tokens: Histogram | None = None
        self.max_new_tokens: Histogram | None = None
        self.batch = BatchMetrics()
        self._replica_batches: dict[str, list] = {}  # behind `tokenmill serve`: each model server's batch samples

    def _skipped_tokens(self, speculate: int) -> Histogram:
        return Histogram("tgi_request_skipped_tokens", "Speculated tokens per request",
                         buckets=skipped_buckets(speculate), registry=self.registry)

    def configure(self, max_input_tokens: int, max_total_tokens: int, max_batch_total_tokens: int,
                  speculate: int = 0) -> None:
        r = self.registry
        for old in (self.input_length, self.generated_tokens, self.max_new_tokens, self.skipped_tokens):
            if old is not None:  # configured again: the new limits' buckets replace the old
                r.unregister(old)
        self.skipped_tokens = self._skipped_tokens(speculate)
        self.input_length = Histogram("tgi_request_input_length", "Input token length per request",
                                      buckets=linear_buckets(max_input_tokens), registry=r)
        self.generated_tokens = Histogram("tgi_request_generated_tokens", "Generated tokens per request",
                                          buckets=linear_buckets(max_total_tokens), registry=r)
        self.max_new_tokens = Histogram("tgi_request_max_new_tokens", "Maximum new tokens per request",
                                        buckets=linear_buckets(max_total_tokens), registry=r)
        self.max_total_tokens.set(max_batch_total_tokens)

    def observe_replica_batches(self, snapshots: dict[str, str]) -> None:
        """Keep each model server's latest batch samples (`BatchMetrics.snapshot`), by address. A server
        that stops answering keeps its last ones, so the sums do not fall while it is away."""
        for address, snapshot in snapshots.items():
            if snapshot:
                self._replica_batches[address] = json.loads(snapshot)

    def families(self) -> Iterable[Metric]:
        yield from self.registry.collect()
        if self._replica_batches:
            yield from BatchMetrics.families_from(sample for samples in self._replica_batches.values()
                                                  for sample in samples)
        else:
            yield from self.batch.registry.collect()

    def exposition(self) -> str:
        return "".join(_family_text(family) for family in self.families())


class BatchMetrics:
    """TGI's `tgi_batch_*` families, fed by engine steps (`StepStats`), on the engine's thread.

    Each step is one of TGI's inference calls, `method` "prefill" when it feeds prompt tokens. TGI's
    phases map to tokenmill's step: forward = the model and sampling up to the device wait, decode =
    detokenizing and stop checks, filter = advancing the batch past the step, inference = the whole
    step. New requests joining a running batch is TGI's concatenation, reason "chunking" (tokenmill
    always mixes them in, as TGI's chunked-prefill path does), its duration the step's scheduling.
    """

    DECLARED = {  # name: (type, help, label names)
        "tgi_batch_inference_count": ("counter", "Inference calls per method (prefill or decode)", ("method",)),
        "tgi_batch_inference_success": ("counter", "Number of successful inference calls per method (prefill or "
                                                   "decode)", ("method",)),
        "tgi_batch_inference_failure": ("counter", "Number of failed inference calls per method (prefill or decode)",
                                        ("method",)),
        "tgi_batch_inference_duration": ("histogram", "Batch inference duration", ("method",)),
        "tgi_batch_forward_duration": ("histogram", "Batch forward duration per method (prefill or decode)",
                                       ("method",)),
        "tgi_batch_decode_duration": ("histogram", "Time spent decoding a batch per method (prefill or decode)",
                                      ("method",)),
        "tgi_batch_filter_duration": ("histogram", "Time spent filtering batches and sending generated tokens per "
                                                   "method (prefill or decode)", ("method",)),
        "tgi_batch_concat": ("counter", "Batch concatenations, by reason", ("reason",)),
        "tgi_batch_concat_duration": ("histogram", "Batch concatenation duration", ("method",)),
        "tgi_batch_next_size": ("histogram", "Batch size of the next batch", ()),
        "tgi_batch_current_max_tokens": ("gauge", "Maximum tokens for the current batch", ()),
    }

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._last_step = -1
        m = {}
        for name, (kind, doc, labels) in self.DECLARED.items():
            if kind == "counter":
                m[name] = Counter(name, doc, labels, registry=self.registry)
            elif kind == "gauge":
                m[name] = Gauge(name, doc, labels, registry=self.registry)
            else:
                buckets = BATCH_SIZE if name == "tgi_batch_next_size" else DURATION
                m[name] = Histogram(name, doc, labels, buckets=buckets, registry=self.registry)
        self._m = m
        for method in METHODS:  # TGI's exporter shows a series once touched; these exist from the start at 0
            for name in ("tgi_batch_inference_count", "tgi_batch_inference_success", "tgi_batch_inference_failure"):
                m[name].labels(method=method)

    def observe_engine(self, engine) -> None:
        """Record the engine's latest step, once (listeners also run between steps)."""
        stats: StepStats | None = engine.last_step
        with self._lock:
            if stats is None or stats.step == self._last_step:
                return
            self._last_step = stats.step
        running = engine.scheduler.running
        self.observe(stats, sum(r.num_prompt_tokens + r.sampling_params.max_new_tokens for r in running))

    def observe(self, stats: StepStats, current_max_tokens: int) -> None:
        m, method = self._m, stats.method
        m["tgi_batch_current_max_tokens"].set(current_max_tokens)
        m["tgi_batch_inference_count"].labels(method=method).inc()
        if stats.failed:
            m["tgi_batch_inference_failure"].labels(method=method).inc()
            return
        m["tgi_batch_inference_success"].labels(method=method).inc()
        m["tgi_batch_inference_duration"].labels(method=method).observe(stats.total_s)
        m["tgi_batch_forward_duration"].labels(method=method).observe(stats.forward_s)
        m["tgi_batch_decode_duration"].labels(method=method).observe(stats.decode_s)
        m["tgi_batch_filter_duration"].labels(method=method).observe(stats.filter_s)
        if stats.num_new_seqs:
            m["tgi_batch_next_size"].observe(stats.num_new_seqs)
        if stats.joined_running:
            m["tgi_batch_concat"].labels(reason="chunking").inc()
            m["tgi_batch_concat_duration"].labels(method="decode").observe(stats.schedule_s)  # TGI's label, always

    def snapshot(self) -> str:
        """The samples, as JSON: what a model server sends the router with its info."""
        return json.dumps([[s.name, s.labels, s.value] for family in self.registry.collect()
                           for s in family.samples if not s.name.endswith("_created")])

    @classmethod
    def families_from(cls, samples: Iterable[list]) -> list[Metric]:
        """Families summing several model servers' snapshots (counts, sums and gauges add up)."""
        totals: dict[tuple, float] = defaultdict(float)
        for name, labels, value in samples:
            totals[name, tuple(sorted(labels.items()))] += value
        families = {name: Metric(name, doc, kind) for name, (kind, doc, _) in cls.DECLARED.items()}
        for (name, labels), value in totals.items():
            family = families.get(_family_name(name))
            if family is not None:
                family.add_sample(name, dict(labels), value)
        return list(families.values())


def _family_name(sample: str) -> str:
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in BatchMetrics.DECLARED:
            return sample[: -len(suffix)]
    return sample


def _family_text(family: Metric) -> str:
    """A family in the text format as TGI's exporter writes it: a counter's samples under its own name,
    no `_created` series."""
    lines = [f"# HELP {family.name} {_escape(family.documentation, quotes=False)}\n",
             f"# TYPE {family.name} {family.type}\n"]
    for sample in family.samples:
        if sample.name.endswith("_created"):
            continue
        name = family.name if family.type == "counter" else sample.name
        labels = ",".join(f'{key}="{_escape(value)}"' for key, value in sorted(sample.labels.items()))
        lines.append(f"{name}{{{labels}}} {floatToGoString(sample.value)}\n" if labels
                     else f"{name} {floatToGoString(sample.value)}\n")
    return "".join(lines)


def _escape(text: str, quotes: bool = True) -> str:
    text = text.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if quotes else text
