"""The benchmark's figures and report, on synthetic timings (the real run is `make bench`)."""

from benchmarks import report
from benchmarks.load import RequestRecord
from benchmarks.stats import median_of_passes, summarise


def _record(sent: float, gaps: list[float], ttft: float) -> RequestRecord:
    times = [sent + ttft]
    for gap in gaps:
        times.append(times[-1] + gap)
    return RequestRecord(ok=True, sent=sent, token_times=times, output_tokens=len(times), finished=times[-1])


def test_summary_figures() -> None:
    records = [_record(0.0, [0.01] * 9, 0.5), _record(0.0, [0.03] * 9, 1.5),
               RequestRecord(ok=False, error="HTTP 500")]
    summary = summarise(records, duration_s=2.0)
    assert summary["errors"] == 1 and summary["first_error"] == "HTTP 500"
    assert summary["output_tok_s"] == 10.0  # 20 tokens in 2 s
    assert abs(summary["ttft_p50_s"] - 1.0) < 1e-9
    assert abs(summary["itl_p50_s"] - 0.02) < 1e-9
    merged = median_of_passes([summary, {**summary, "output_tok_s": 30.0, "errors": 0}, {**summary, "output_tok_s": 20.0}])
    assert merged["output_tok_s"] == 20.0 and merged["errors"] == 2


def _results(ours_tok_s: float) -> dict:
    def level(tok_s, itl, ttft):
        return {"output_tok_s": tok_s, "itl_p50_s": itl, "ttft_p99_s": ttft, "requests_s": 1.0, "errors": 0}

    return {
        "started": "now", "command": "test", "passes": 1, "levels": ["1", "16", "64"],
        "machine": {"cpu": "x", "usable_cores": 2, "flags": [], "memory_gib": 1, "threads": 2,
                    "read_bandwidth_gbs": 30.0, "bf16_matmul_gflops": 400.0, "torch": "t"},
        "model_bf16_bytes": 269_000_000, "model_served_bytes": 97_000_000,
        "servers": {
            "tokenmill": {"startup_s": 5.0, "peak_rss_gib": 1.0, "levels": {
                "1": level(100, 0.010, 0.1), "16": level(ours_tok_s, 0.03, 0.4), "64": level(800, 0.08, 1.0)}},
            "llama-server": {"startup_s": 1.0, "peak_rss_gib": 1.0, "levels": {
                "1": level(100, 0.009, 0.1), "16": level(200, 0.07, 1.0), "64": level(200, 0.3, 9.0)}},
            "vllm": {"startup_s": 90.0, "peak_rss_gib": 6.0, "levels": {
                "1": level(50, 0.02, 0.5), "16": level(400, 0.036, 0.5), "64": level(600, 0.09, 2.0)}},
        },
    }


def test_acceptance_rows_follow_the_issue() -> None:
    rows = {point: holds for point, _, holds in report.acceptance_rows(_results(ours_tok_s=500))}
    assert rows["c=1: ITL p50 ≤ 1.2× llama-server's"] is True  # 10 ms vs 9 ms
    assert rows["c=16: tok/s ≥ 1.2× vLLM's"] is True  # 500 vs 400
    assert rows["c=16: TTFT p99 ≤ the lower peer's"] is True
    assert rows["peak RSS ≤ 1/3 of vLLM's"] is True
    slower = {point: holds for point, _, holds in report.acceptance_rows(_results(ours_tok_s=450))}
    assert slower["c=16: tok/s ≥ 1.2× vLLM's"] is False  # 450 < 480


def test_the_start_up_row_holds_the_warm_start_to_both_limits() -> None:
    def startup(seconds: float, gib: float) -> dict:
        figures = {"first_answer_s": seconds, "peak_rss_gib": gib, "pss_gib": gib, "router_cpu_s": 1.0,
                   "model_server_cpu_s": 2.0}
        return {"passes": 1, "flags": {"warm": ""}, "variants": {"warm": {**figures, "raw": [figures]}}}

    row = "make serve: first answer ≤ 3 s, peak RSS ≤ 1 GiB (warm cache)"
    for seconds, gib, holds in ((2.5, 0.9, True), (3.5, 0.9, False), (2.5, 1.2, False)):
        results = {**_results(ours_tok_s=500), "startup": startup(seconds, gib)}
        assert {point: ok for point, _, ok in report.acceptance_rows(results)}[row] is holds


def test_report_and_plots_are_written(tmp_path) -> None:
    results = _results(ours_tok_s=500)
    results["quality"] = {"tokens": 650, "perplexity": {"transformers float32 (reference)": 34.0, "served": 34.34}}
    path = report.write(results, tmp_path)
    text = path.read_text()
    assert "| c=16 | tokenmill | 500.0 |" in text and "Acceptance" in text
    assert "| served | 34.340 | 1.0100× |" in text
    assert (tmp_path / "throughput_vs_concurrency.png").stat().st_size > 0
    assert (tmp_path / "latency_vs_throughput.png").stat().st_size > 0


def _tensor_parallel() -> dict:
    def level(tok_s, itl):
        return {"output_tok_s": tok_s, "itl_p50_s": itl, "errors": 0}

    def config(flags, tok_s_1, tok_s_16):
        return {"flags": flags, "startup_s": 6.0, "peak_rss_gib": 1.0,
                "levels": {"1": level(tok_s_1, 1 / tok_s_1), "16": level(tok_s_16, 16 / tok_s_16)}}

    return {
        "model": "SmolLM2 shape", "levels": ["1", "16"], "passes": 1,
        "configs": {"1 shard, 2 cores": config("(defaults)", 40.0, 400.0),
                    "1 shard, 1 core": config("--num-shard 1 --cpu-bind 0", 30.0, 250.0),
                    "2 shards, 1 core each": config("--num-shard 2 --cpu-bind 0|1", 20.0, 200.0)},
        "micro": {"steps": 30, "passes": 1, "rows": [
            {"config": "1 rank, 1 core", "forward": "one call", "batch": 1, "step_ms": 25.0},
            {"config": "1 rank, 1 core", "forward": "modules", "batch": 1, "step_ms": 40.0},
            {"config": "2 ranks, 1 core each", "forward": "modules", "batch": 1, "step_ms": 50.0,
             "collectives_per_step": 62, "collective_ms": 20.0, "collective_ms_rank1": 22.0, "exchange_ms": 8.0}]},
    }


def test_the_tensor_parallel_section_renders_its_tables_and_what_they_mean(tmp_path) -> None:
    results = _results(ours_tok_s=500)
    results["tensor_parallel"] = _tensor_parallel()
    text = report.write(results, tmp_path).read_text()
    section = text[text.index("## Tensor parallelism on this machine"):]
    assert "| 2 shards, 1 core each | `--num-shard 2 --cpu-bind 0|1` | 20.0 | 50.0 | 200.0 | 80.0 | 6.0 |" in section
    assert "| 1 shard, 2 cores | 0.50× | 2.00× | 0.50× | 2.00× |" in section  # 2 shards over 1 shard on 2 cores
    assert "| 1 shard, 1 core | 0.67× | 1.50× | 0.80× | 1.25× |" in section
    assert "| 2 ranks, 1 core each | modules | 1 | 50.00 | 62 | 20.00 | 8.00 | 40 % |" in section
    assert "give 0.50× the output tok/s of the faster 1-shard configuration (1 shard, 2 cores) at c=16" in section
    assert "0.80× against 1 shard, 1 core at c=16" in section and "costs throughput on this machine" in section
    assert "20.0 ms of its 50.0 ms in them (40 %" in section
    assert "multi-socket" in section and "do not fit one device" in section


def test_a_tensor_parallel_run_alone_leaves_the_full_report(tmp_path) -> None:
    (tmp_path / "REPORT.md").write_text("the full run's report")
    results = {"started": "now", "command": "test", "machine": _results(500)["machine"],
               "tensor_parallel": {**_tensor_parallel(), "micro": None}}
    path = report.write_tensor_parallel(results, tmp_path)
    assert path.name == "TENSOR_PARALLEL.md" and "## Tensor parallelism on this machine" in path.read_text()
    assert "Why:" not in path.read_text()  # no in-process figures, no claim about them
    assert (tmp_path / "REPORT.md").read_text() == "the full run's report"
