"""/metrics as TGI's and vLLM's users read it: TGI's Grafana dashboard and tokenmill's own
(deploy/grafana/tokenmill.json) find data for every query, TGI's names, types and bucket layouts, each
request counted once, and vLLM's names as aliases."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import TinyServer
from tests.api.dashboards import dashboard_gaps, selectors, tokenmill_queries
from tokenmill.api.grpc import model_server_pb2 as pb
from tokenmill.api.metrics import Metrics
from tokenmill.api.tgi_metrics import BatchMetrics
from tokenmill.outputs import StepStats

DASHBOARD = json.loads((Path(__file__).parent / "data" / "tgi_grafana_queries.json").read_text())
TGI_QUERIES = [(query["panel"], query["expr"]) for query in DASHBOARD["queries"]]
# Only a router fronting model servers reports on them: checked behind `tokenmill serve`.
REPLICA_SERIES = ("tokenmill_replica_",)
LONG = " ".join(f"w{5 + i % 50}" for i in range(40))  # longer than a KV block: a second send hits the prefix cache


@pytest.fixture(scope="module")
def server():
    server = TinyServer(max_concurrent_requests=8)
    yield server
    server.stop()


def _url(server) -> str:
    return server if isinstance(server, str) else server.url


def _post(server, path: str, body) -> httpx.Response:
    return httpx.post(f"{_url(server)}{path}", json=body, timeout=120)


def _text(server) -> str:
    return httpx.get(f"{_url(server)}/metrics", timeout=10).text


def _families(server) -> dict:
    return {f.name: f for f in text_string_to_metric_families(_text(server))}


def _value(server, name: str, **labels) -> float:
    """A sample's value; prometheus_client's parser names a counter's samples `<name>_total` whatever the
    text said, so a counter is looked up under both (the raw names are checked on their own)."""
    for family in text_string_to_metric_families(_text(server)):
        for sample in family.samples:
            if sample.name in (name, f"{name}_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _traffic(server, running_tokens: int = 200) -> None:
    """Successes on TGI's and OpenAI's routes, a validation failure, and a request joining a running batch."""
    assert _post(server, "/generate", {"inputs": "w5 w6 w7", "parameters": {"max_new_tokens": 4}}).status_code == 200
    chat = {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 3}
    assert _post(server, "/v1/chat/completions", chat).status_code == 200
    assert _post(server, "/generate", {"inputs": "w5", "parameters": {"temperature": -1}}).status_code == 422
    running = {"prompt": "w8 w9", "max_tokens": running_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{_url(server)}/v1/completions", json=running, timeout=120) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # decoding now
        joining = _post(server, "/generate", {"inputs": "w10 w11", "parameters": {"max_new_tokens": 2}})
        assert joining.status_code == 200
        assert any("[DONE]" in line for line in lines)


def test_the_dashboard_queries_are_all_there() -> None:
    assert len(TGI_QUERIES) == 57
    assert all(selectors(expr) for _, expr in TGI_QUERIES)
    assert len(tokenmill_queries()) == 21
    assert all(selectors(expr) for _, expr in tokenmill_queries())


def test_every_query_of_tgi_s_grafana_dashboard_finds_data(server) -> None:
    _traffic(server)
    assert dashboard_gaps(_text(server), TGI_QUERIES) == []


def test_every_query_of_tokenmill_s_grafana_dashboard_finds_data() -> None:
    """deploy/grafana/tokenmill.json: KV and prefix cache, compiles, speculation (drafts from a copy-heavy
    prompt), latencies; every series its queries select is exported, and every histogram has counted."""
    server = TinyServer(speculate=3, max_concurrent_requests=8)
    try:
        _traffic(server, running_tokens=40)
        phrase = " ".join(f"w{i}" for i in (5, 9, 14, 5, 22, 9)) + " "
        copy = {"inputs": phrase * 6, "parameters": {"max_new_tokens": 24}}
        for _ in range(2):  # the second send hits the prefix cache
            assert _post(server, "/generate", copy).status_code == 200

        def gaps() -> list[str]:  # no preemption or compilation happens here: those counters stay at 0
            return dashboard_gaps(_text(server), tokenmill_queries(), counted=("histogram",), skip=REPLICA_SERIES)

        assert _wait_for(lambda: not gaps()), gaps()  # the engine thread observes its last step after answering
    finally:
        server.stop()


@pytest.mark.slow
def test_every_dashboard_query_finds_data_behind_tokenmill_serve(served_smollm2) -> None:
    """The default deployment: the engine steps run in a model-server process, and their batch metrics
    reach the router's /metrics with its info (each health round)."""
    _traffic(served_smollm2, running_tokens=48)

    def gaps() -> list[str]:
        """tokenmill's dashboard: exported, replicas included. Speculation is off here: its counters stay at 0,
        and the per-position one has no series (one per draft position, as in vLLM)."""
        text = _text(served_smollm2)
        return dashboard_gaps(text, TGI_QUERIES) + dashboard_gaps(
            text, tokenmill_queries(), counted=(), skip=("vllm:spec_decode_num_accepted_tokens_per_pos",))

    assert _wait_for(lambda: not gaps(), timeout_s=15), gaps()


def test_tgi_s_counters_keep_their_names_and_have_no_created_series(server) -> None:
    _post(server, "/generate", {"inputs": "w5 w6", "parameters": {"max_new_tokens": 2}})
    _post(server, "/generate", {"inputs": "w5 w6", "parameters": {"top_p": 1.0}})
    text = _text(server)
    for counter in ("tgi_request_count", "tgi_request_success", "tgi_batch_inference_count"):
        assert f"# TYPE {counter} counter" in text
    assert re.search(r"^tgi_request_count \d", text, re.M)
    assert re.search(r"^tgi_request_success \d", text, re.M)
    assert re.search(r'^tgi_request_failure\{err="validation"\} \d', text, re.M)
    names = set(re.findall(r"^(?:# (?:TYPE|HELP) )?(tgi_\w+)", text, re.M))
    assert names
    assert not [name for name in names if name.endswith(("_total", "_created"))]


def test_each_request_counts_once_as_a_success_or_a_failure_by_tgi_s_error_kind(server) -> None:
    names = {"count": ("tgi_request_count", {}), "success": ("tgi_request_success", {}),
             "validation": ("tgi_request_failure", {"err": "validation"}),
             "dropped": ("tgi_request_failure", {"err": "dropped"})}

    def counts() -> dict[str, float]:
        return {key: _value(server, name, **labels) for key, (name, labels) in names.items()}

    before = counts()
    assert _post(server, "/generate", {"inputs": "w5", "parameters": {"max_new_tokens": 2}}).status_code == 200
    chat = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2, "n": 2}
    assert len(_post(server, "/v1/chat/completions", chat).json()["choices"]) == 2  # one request, two choices
    assert _post(server, "/generate", {"inputs": "w5", "parameters": {"top_k": 0}}).status_code == 422
    stream = httpx.post(f"{server.url}/generate_stream", json={"inputs": "w5", "parameters": {"top_k": 0}}, timeout=60)
    assert stream.status_code == 200 and '"error_type": "validation"' in stream.text  # refused in-band
    # A body that does not deserialize never reaches a handler: TGI counts nothing for it.
    assert _post(server, "/generate", {"inputs": 5}).status_code == 422
    body = {"prompt": "w5", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        next(line for line in response.iter_lines() if line.startswith("data:"))  # then the client leaves
    assert _wait_for(lambda: counts()["dropped"] == before["dropped"] + 1)
    after = counts()
    assert {key: after[key] - before[key] for key in names} == {"count": 5, "success": 2, "validation": 2,
                                                                 "dropped": 1}


def _bounds(family, **labels) -> list[float]:
    return [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
            and all(s.labels.get(k) == v for k, v in labels.items())]


def test_bucket_layouts_are_tgi_s(server) -> None:
    _post(server, "/generate", {"inputs": "w5", "parameters": {"max_new_tokens": 2}})
    families = _families(server)
    info = httpx.get(f"{server.url}/info").json()
    durations = {"tgi_request_duration": {}, "tgi_request_queue_duration": {},
                 "tgi_batch_forward_duration": {"method": "decode"}}
    for name, labels in durations.items():
        bounds = _bounds(families[name], **labels)
        assert len(bounds) == 35 and bounds[0] == pytest.approx(0.00015), name
        assert all(b / a == pytest.approx(1.5) for a, b in zip(bounds, bounds[1:])), name
    limits = {"tgi_request_input_length": info["max_input_tokens"], "tgi_request_generated_tokens":
              info["max_total_tokens"], "tgi_request_max_new_tokens": info["max_total_tokens"]}
    for name, limit in limits.items():
        bounds = _bounds(families[name])
        assert len(bounds) == 100 and bounds[-1] == pytest.approx(limit), name
        assert bounds == pytest.approx([limit / 100 * (i + 1) for i in range(100)]), name
    assert _bounds(families["tgi_batch_next_size"]) == [float(i) for i in range(1, 1025)]


def test_vllm_s_names_follow_the_same_traffic(server) -> None:
    labels = {"model_name": "tiny-llama", "engine": "0"}
    names = ("vllm:generation_tokens", "vllm:prompt_tokens", "vllm:time_to_first_token_seconds_count",
             "vllm:e2e_request_latency_seconds_count", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits")
    before = {name: _value(server, name, **labels) for name in names}
    success = _value(server, "vllm:request_success", finished_reason="length", **labels)
    usage = [_post(server, "/v1/completions", {"prompt": LONG, "max_tokens": 5, "ignore_eos": True}).json()["usage"]
             for _ in range(2)]
    after = {name: _value(server, name, **labels) for name in names}
    prompt_tokens = sum(u["prompt_tokens"] for u in usage)
    assert after["vllm:generation_tokens"] - before["vllm:generation_tokens"] == 10
    assert after["vllm:prompt_tokens"] - before["vllm:prompt_tokens"] == prompt_tokens
    assert after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"] == prompt_tokens
    assert after["vllm:prefix_cache_hits"] > before["vllm:prefix_cache_hits"]  # the second send reused the first
    assert after["vllm:time_to_first_token_seconds_count"] - before["vllm:time_to_first_token_seconds_count"] == 2
    assert after["vllm:e2e_request_latency_seconds_count"] - before["vllm:e2e_request_latency_seconds_count"] == 2
    assert _value(server, "vllm:request_success", finished_reason="length", **labels) == success + 2
    families = _families(server)
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert families[gauge].type == "gauge"
        assert [s.labels for s in families[gauge].samples] == [labels]
    text = _text(server)
    assert "tokenmill_compiles_total" in text and "tokenmill_kv_cache_usage_ratio" in text


def _stats(step: int, prefill: int, decode: int, new: int = 0, seqs: int = 1, failed: bool = False) -> StepStats:
    return StepStats(step=step, num_seqs=seqs, num_new_seqs=new, num_prefill_tokens=prefill, num_decode_tokens=decode,
                     total_s=0.01, forward_s=0.005, failed=failed)


def test_the_router_sums_its_model_servers_batch_metrics() -> None:
    """Behind `tokenmill serve` the steps run in the model servers: each sends its samples when a scrape asks."""
    first, second = BatchMetrics(), BatchMetrics()
    first.observe(_stats(0, prefill=3, decode=0, new=1), current_max_tokens=10)
    first.observe(_stats(1, prefill=0, decode=1), current_max_tokens=10)
    second.observe(_stats(0, prefill=0, decode=2, seqs=2), current_max_tokens=20)
    second.observe(_stats(1, prefill=4, decode=1, new=1, seqs=2), current_max_tokens=20)
    second.observe(_stats(2, prefill=0, decode=2, seqs=2, failed=True), current_max_tokens=20)
    servers = {"unix:a": first, "unix:b": second}
    replicas = [SimpleNamespace(address=address, healthy=True, draining=False, num_requests=0,
                                info=pb.InfoResponse(ready=True, kv_capacity_tokens=100)) for address in servers]

    async def batch_metrics() -> dict[str, str]:
        return {address: b.snapshot() for address, b in servers.items()}

    router = SimpleNamespace(replicas=replicas, prefix_lookups=0, prefix_hits=0, changes={}, batch_metrics=batch_metrics)
    metrics = Metrics()
    metrics.observe_replicas(router)
    assert "tgi_batch_current_max_tokens 0.0" in metrics.render().decode()  # a health round alone brings none
    metrics.refreshers.append(lambda: metrics.observe_replica_batches(router))
    asyncio.run(metrics.refresh())  # what a scrape of the router's /metrics does first
    text = metrics.render().decode()
    assert 'tgi_batch_inference_count{method="decode"} 3.0' in text
    assert 'tgi_batch_inference_success{method="decode"} 2.0' in text
    assert 'tgi_batch_inference_failure{method="decode"} 1.0' in text
    assert 'tgi_batch_forward_duration_count{method="prefill"} 2.0' in text
    assert 'tgi_batch_concat{reason="chunking"} 1.0' in text
    assert "tgi_batch_current_max_tokens 30.0" in text
    assert "tgi_batch_max_total_tokens 200.0" in text
    assert not [name for name in re.findall(r"^(tgi_\w+)", text, re.M) if name.endswith(("_total", "_created"))]


def test_speculative_decoding_shows_in_vllm_counters_and_tgi_skipped_tokens() -> None:
    server = TinyServer(speculate=3)
    try:
        phrase = " ".join(f"w{i}" for i in (5, 9, 14, 5, 22, 9)) + " "
        response = _post(server, "/generate", {"inputs": phrase * 6, "parameters": {"max_new_tokens": 40,
                                                                                    "details": True}})
        assert response.status_code == 200
        stats = server.engine.speculation
        assert stats.num_accepted_tokens > 0
        deadline = time.monotonic() + 10  # the engine thread observes its step after answering
        while _value(server, "vllm:spec_decode_num_accepted_tokens") != stats.num_accepted_tokens:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _value(server, "vllm:spec_decode_num_drafts") == stats.num_drafts
        assert _value(server, "vllm:spec_decode_num_draft_tokens") == stats.num_draft_tokens
        assert [_value(server, "vllm:spec_decode_num_accepted_tokens_per_pos", position=str(k))
                for k in range(3)] == (stats.accepted_per_position + [0, 0, 0])[:3]
        assert _value(server, "tokenmill_decode_tokens_per_forward") == pytest.approx(stats.tokens_per_forward)
        assert stats.tokens_per_forward > 1
        # TGI's histogram: per request and step, the tokens past the first; buckets 0 to --speculate.
        assert _value(server, "tgi_request_skipped_tokens_sum") == stats.num_accepted_tokens
        assert _value(server, "tgi_request_skipped_tokens_count") == stats.num_decode_forwards + 1  # and the prefill
        assert 'tgi_request_skipped_tokens_bucket{le="3.0"}' in _text(server)
    finally:
        server.stop()
