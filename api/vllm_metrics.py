"""vLLM's metric names, as aliases of what tokenmill measures anyway.

Autoscalers and routers of the Kubernetes ecosystem (llm-d's endpoint picker, AIBrix, KEDA recipes)
read `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` and friends. vLLM exports them through
prometheus_client too, so they are written as it writes them (`*_total`, `*_created`), with its
`model_name` and `engine` labels and its bucket layouts (vllm/v1/metrics/loggers.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
        80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
LABELS = ("model_name", "engine")
FINISHED_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "aborted": "abort"}


def one_two_five_buckets(maximum: int) -> tuple[float, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to `maximum` (the model's length)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > maximum:
                return tuple(float(b) for b in buckets)
            buckets.append(value)
        exponent += 1


@dataclass
class VllmSeries:
    """The label-bound series of one served model (vLLM labels every series with it)."""

    running: Gauge
    waiting: Gauge
    kv_cache_usage: Gauge
    prefix_queries: Counter
    prefix_hits: Counter
    preemptions: Counter
    prompt_tokens: Counter
    generation_tokens: Counter
    success: dict[str, Counter]  # by vLLM's finished_reason
    ttft: Histogram
    inter_token: Histogram
    e2e: Histogram
    queue: Histogram
    inference: Histogram
    prefill: Histogram
    decode: Histogram
    request_prompt_tokens: Histogram
    request_generation_tokens: Histogram
    max_tokens: Histogram
    spec_drafts: Counter
    spec_draft_tokens: Counter
    spec_accepted_tokens: Counter
    spec_accepted_per_position: Counter  # the family: labels (model_name, engine, position)
    labels: tuple[str, str]

    def accepted_at(self, position: int) -> Counter:
        return self.spec_accepted_per_position.labels(*self.labels, str(position))


def vllm_series(registry: CollectorRegistry, model_name: str, max_model_len: int) -> VllmSeries:
    """Register vLLM's families in `registry` and bind them to `model_name` (engine "0")."""
    r, labels = registry, (model_name, "0")

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(name, doc, LABELS, registry=r).labels(*labels)

    def counter(name: str, doc: str) -> Counter:
        return Counter(name, doc, LABELS, registry=r).labels(*labels)

    def histogram(name: str, doc: str, buckets) -> Histogram:
        return Histogram(name, doc, LABELS, buckets=buckets, registry=r).labels(*labels)

    tokens = one_two_five_buckets(max_model_len)
    success = Counter("vllm:request_success", "Count of successfully processed requests.",
                      LABELS + ("finished_reason",), registry=r)
    return VllmSeries(
        running=gauge("vllm:num_requests_running", "Number of requests in model execution batches."),
        waiting=gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
        kv_cache_usage=gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
        prefix_queries=counter("vllm:prefix_cache_queries",
                               "Prefix cache queries, in terms of number of queried tokens."),
        prefix_hits=counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
        preemptions=counter("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
        prompt_tokens=counter("vllm:prompt_tokens", "Number of prefill tokens processed."),
        generation_tokens=counter("vllm:generation_tokens", "Number of generation tokens processed."),
        success={reason: success.labels(*labels, reason) for reason in ("stop", "length", "abort")},
        ttft=histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT),
        inter_token=histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                              INTER_TOKEN),
        e2e=histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                      REQUEST_LATENCY),
        queue=histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                        REQUEST_LATENCY),
        inference=histogram("vllm:request_inference_time_seconds",
                            "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY),
        prefill=histogram("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
                          REQUEST_LATENCY),
        decode=histogram("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
                         REQUEST_LATENCY),
        request_prompt_tokens=histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens),
        request_generation_tokens=histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                            tokens),
        max_tokens=histogram("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
                             tokens),
        spec_drafts=counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts."),
        spec_draft_tokens=counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens."),
        spec_accepted_tokens=counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens."),
        spec_accepted_per_position=Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                           "Accepted tokens per draft position.", LABELS + ("position",), registry=r),
        labels=labels,
    )
