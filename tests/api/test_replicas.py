"""A router in front of two model-server processes: load spreading, failure isolation, one trace id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.api.conftest import CHAT_TEMPLATE, free_port, wait_healthy
from tests.tiny_models import build_tiny, tiny_tokenizer


class SpanCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """A local OTLP receiver: keeps every span it is sent, with its service name."""

    def __init__(self):
        self.spans: list[tuple[str, str, str]] = []  # (service, span name, trace id hex)
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append((service, span.name, span.trace_id.hex()))
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def collector():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    spans = SpanCollector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(spans, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    spans.endpoint = f"http://127.0.0.1:{port}"
    yield spans
    server.stop(0)


cluster_router: list[subprocess.Popen] = []  # the router process, for the shutdown test


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, collector):
    """Two model servers on TCP ports and a router fronting both, all as subprocesses."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny = build_tiny("llama")
    tiny.reference.save_pretrained(folder, safe_serialization=True)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    engine_flags = ["--model-id", str(folder), "--dtype", "float32", "--kv-cache-bytes", str(16 << 20),
                    "--otlp-endpoint", collector.endpoint]
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    logs = tmp_path_factory.mktemp("logs")
    replicas = [subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "model-server", "--listen", a, *engine_flags],
                                 env=env, stderr=open(logs / f"replica{i}.log", "w"))
                for i, a in enumerate(addresses)]
    port = free_port()
    router_cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--hostname", "127.0.0.1", "--port", str(port),
                  "--grpc-port", "0", "--otlp-endpoint", collector.endpoint, "--model-id", str(folder)]
    for address in addresses:
        router_cmd += ["--model-server", address]
    router = subprocess.Popen(router_cmd, env=env, stderr=open(logs / "router.log", "w"))
    print(f"logs in {logs}")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 180, router)
        deadline = time.monotonic() + 60  # both replicas healthy in the router's eyes
        while time.monotonic() < deadline and _metric(url, "tokenmill_replica_healthy") < 2:
            time.sleep(0.3)
        cluster_router[:] = [router]
        yield url, replicas, addresses
    finally:
        for process in [router, *replicas]:
            if process.poll() is None:
                process.terminate()
        for process in [router, *replicas]:
            process.wait(timeout=30)


def _metric(url: str, name: str, label: str | None = None) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and (label is None or label in line):
            total += float(line.split()[-1])
    return total


def _generate(url: str, max_new_tokens: int) -> httpx.Response:
    body = {"inputs": "w5 w6 w7", "parameters": {"max_new_tokens": max_new_tokens}}
    return httpx.post(f"{url}/generate", json=body, timeout=120)


def test_twenty_concurrent_requests_spread_over_both_replicas(cluster) -> None:
    url, _, addresses = cluster
    with futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: _generate(url, 40), range(20)))
    assert all(r.status_code == 200 for r in responses)
    time.sleep(1.5)  # the router refreshes its per-replica gauges every second
    counts = [_metric(url, "tokenmill_replica_requests", f'replica="{a}"') for a in addresses]
    assert sum(counts) >= 20 and min(counts) >= 5, counts


def test_the_dashboard_shows_each_replica_and_the_output_rate(cluster) -> None:
    url, _, addresses = cluster
    data = httpx.get(f"{url}/dashboard/data", timeout=10).json()
    replicas = {r["address"]: r for r in data["replicas"]}
    assert set(replicas) == set(addresses)
    assert all(r["healthy"] and r["requests"] >= 5 and r["failures"] == 0 for r in replicas.values())
    assert set(data["points"][-1]["load"]) == set(addresses)
    assert any(p["output_tokens_per_s"] > 0 for p in data["points"])
    assert any(p["ttft_s"]["p50"] is not None for p in data["points"])


def test_one_trace_id_spans_router_and_model_server(cluster, collector) -> None:
    url, _, _ = cluster
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    body = {"inputs": "w5 w6", "parameters": {"max_new_tokens": 4}}
    assert httpx.post(f"{url}/generate", json=body, headers=headers, timeout=60).status_code == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with collector.lock:
            ours = [(service, name) for service, name, tid in collector.spans if tid == trace_id]
        services = {service for service, _ in ours}
        if {"tokenmill.router", "tokenmill.model_server"} <= services and ("tokenmill.model_server", "decode") in ours:
            break
        time.sleep(0.2)
    names = {name for _, name in ours}
    assert {"tokenmill.router", "tokenmill.model_server"} <= services
    assert {"validation", "model_server.generate", "queue", "prefill", "decode"} <= names


def test_a_disconnected_stream_frees_blocks_on_the_model_server(cluster) -> None:
    url, _, _ = cluster
    body = {"inputs": "w5 w6", "parameters": {"max_new_tokens": 1000}}
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i > 10:
                break
    deadline = time.monotonic() + 15  # the router refreshes the replicas' KV usage every second
    while time.monotonic() < deadline and _metric(url, "tokenmill_kv_cache_usage_ratio") > 0:
        time.sleep(0.3)
    assert _metric(url, "tokenmill_kv_cache_usage_ratio") == 0.0
    assert _metric(url, "tgi_batch_current_size") == 0
    # The steps ran on the model servers: a scrape of the router fetches their batch samples.
    assert _metric(url, "tgi_batch_inference_count", 'method="decode"') > 0


def test_grammars_compile_on_the_model_servers_and_a_bad_one_is_a_422(cluster) -> None:
    pytest.importorskip("xgrammar")
    url = cluster[0]
    body = {"inputs": "w5", "parameters": {"max_new_tokens": 4, "details": True,
                                           "grammar": {"type": "regex", "value": "w5w7(w9)*"}}}
    answer = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert [t["text"] for t in answer.json()["details"]["tokens"]][:2] == ["w5", "w7"]
    body["parameters"]["grammar"]["value"] = "(w5"
    refused = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert refused.status_code == 422 and "the regex grammar could not be compiled" in refused.json()["error"]


def test_stopping_a_replica_fails_only_its_requests(cluster) -> None:
    url, replicas, _ = cluster
    started = threading.Semaphore(0)
    endings: list[dict] = []

    def stream() -> None:
        body = {"inputs": "w5 w6 w7", "parameters": {"max_new_tokens": 1000}}
        last = None
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=120) as response:
            for i, line in enumerate(response.iter_lines()):
                if line.startswith("data:"):
                    last = json.loads(line[5:])
                    if i == 0:
                        started.release()
        endings.append(last)

    threads = [threading.Thread(target=stream) for _ in range(20)]
    for t in threads:
        t.start()
    for _ in range(20):
        assert started.acquire(timeout=60)
    replicas[0].send_signal(signal.SIGKILL)  # every stream is mid-generation now
    for t in threads:
        t.join()
    failed = [e for e in endings if "error" in e]
    finished = [e for e in endings if e.get("generated_text") is not None]
    assert failed and finished and len(failed) + len(finished) == 20
    for ending in failed:
        assert ending["error_type"] == "generation" and "model server" in ending["error"]
    after = [_generate(url, 5) for _ in range(5)]
    assert all(r.status_code == 200 for r in after)
    assert httpx.get(f"{url}/health").status_code == 200


def test_the_dashboard_shows_the_stopped_replica_unhealthy(cluster) -> None:
    url, _, addresses = cluster
    # The router learns of the death at its next health probe (once a second), and the page's data is
    # sampled once a second: give it a few of each.
    deadline = time.monotonic() + 15
    while True:
        replicas = {r["address"]: r for r in httpx.get(f"{url}/dashboard/data", timeout=10).json()["replicas"]}
        if not replicas[addresses[0]]["healthy"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not replicas[addresses[0]]["healthy"] and replicas[addresses[0]]["failures"] >= 1
    assert replicas[addresses[1]]["healthy"]


def test_sigterm_finishes_in_flight_streams_and_refuses_new_ones(cluster) -> None:
    """Last in this module: it stops the router."""
    url, _, _ = cluster
    router = cluster_router[0]
    endings: list[dict] = []
    first = threading.Event()

    def stream() -> None:  # long enough to outlast the checks below: no end of sequence, 900 tokens
        body = {"prompt": "w5 w6", "max_tokens": 900, "ignore_eos": True, "stream": True}
        last = None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    last = json.loads(line[5:])
                    first.set()
        endings.append(last)

    thread = threading.Thread(target=stream)
    thread.start()
    assert first.wait(30)
    router.send_signal(signal.SIGTERM)
    # Draining: new requests are told to retry elsewhere and the health check fails, while the stream runs.
    refused = httpx.post(f"{url}/generate", json={"inputs": "w5", "parameters": {"max_new_tokens": 2}}, timeout=5)
    health = httpx.get(f"{url}/health", timeout=5).status_code
    drained = thread.is_alive()
    thread.join(60)
    assert refused.status_code == 503 and refused.headers.get("retry-after") == "1", refused.text
    assert health == 503
    assert endings and endings[0]["choices"][0]["finish_reason"] == "length"  # the stream finished
    time.sleep(1)
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{url}/generate", json={"inputs": "w5", "parameters": {"max_new_tokens": 2}}, timeout=5)
    assert router.wait(timeout=60) == 0  # a drain is a clean stop
    assert drained, "the stream ended before the drain could be observed"
