"""The 1B section's figures and report lines, on synthetic passes (the servers run in `make bench`)."""

import pytest

from benchmarks import llama_1b
from benchmarks.stats import median_of_passes


def _server(itl_1: float, tok_s_64: float, startup: float = 5.0) -> dict:
    def level(tok_s, itl):
        return {"output_tok_s": tok_s, "itl_p50_s": itl, "ttft_p99_s": 1.0, "errors": 0}

    return {"startup_s": startup, "peak_rss_gib": 3.0,
            "levels": {"1": level(1 / itl_1, itl_1), "16": level(100.0, 0.15), "64": level(tok_s_64, 0.4)}}


def test_summary_sets_batch_1_itl_against_the_bandwidth_bound() -> None:
    passes = [{"tokenmill": _server(0.100, 150.0), "llama-server": _server(0.110, 60.0),
               "vllm": _server(0.200, 100.0, startup=120.0)},
              {"tokenmill": _server(0.120, 170.0), "llama-server": _server(0.105, 50.0),
               "vllm": _server(0.220, 120.0, startup=100.0)}]
    section = llama_1b.summarise(passes, median_of_passes, bandwidth_gbs=30.0, weight_bytes=2_471_628_800)
    assert section["levels"] == ["1", "16", "64"]
    assert section["bound_itl_s"] == pytest.approx(2.4716288 / 30)  # 82.4 ms
    assert section["servers"]["tokenmill"]["levels"]["1"]["itl_p50_s"] == pytest.approx(0.110)
    assert section["servers"]["vllm"]["startup_s"] == pytest.approx(110.0)
    text = "\n".join(llama_1b.report_lines(section))
    assert "2.47 GB of weights a step at 30.0 GB/s = 82.4 ms" in text
    assert "| tokenmill | 110.0 | 1.34× | 9.2 | 100.0 | 160.0 |" in text  # tok/s: the median of 10 and 8.3
    assert "c=1 ITL p50 tokenmill / llama-server: 1.02×" in text  # 110 against 107.5 ms
    assert "c=64 tok/s tokenmill / vllm: 1.45×" in text  # 160 against 110


def test_report_without_peers_says_so() -> None:
    section = llama_1b.summarise([{"tokenmill": _server(0.1, 150.0)}], median_of_passes, 20.0, 2_000_000_000)
    assert "No peer ran: no ratios." in llama_1b.report_lines(section)


def test_the_full_report_carries_both_new_sections(tmp_path, bpe_tokenizer) -> None:
    from benchmarks import report, traffic
    from tests.bench.test_report import _results
    from tests.bench.test_traffic import _curve

    results = _results(ours_tok_s=500)
    results["model_1b"] = llama_1b.summarise([{"tokenmill": _server(0.1, 150.0)}], median_of_passes, 20.0, 2 * 10**9)
    plan = traffic.TrafficPlan(bpe_tokenizer, requests_per_rate=6, rates=[1.0])
    results["traffic"] = traffic.summarise_passes(plan, {"tokenmill": [{"traffic": _curve({"1": 0.9})}]})
    text = report.write(results, tmp_path).read_text()
    assert "## Realistic traffic: goodput against offered rate" in text and "![goodput](goodput_vs_rate.png)" in text
    assert "## 1B-class model: Llama-3.2-1B's shape, random bf16 weights" in text


def test_each_pass_is_set_against_its_own_bandwidth_probe() -> None:
    # The same 100 ms ITL against a 2 GB step: 1.5x a 30 GB/s probe's bound, 2.5x a 50 GB/s probe's.
    quiet, busy = _server(0.100, 150.0), _server(0.100, 150.0)
    quiet["read_bandwidth_gbs"], busy["read_bandwidth_gbs"] = 50.0, 30.0
    peer = _server(0.100, 60.0)
    peer["read_bandwidth_gbs"] = 40.0
    section = llama_1b.summarise([{"tokenmill": quiet, "llama-server": peer}, {"tokenmill": busy}],
                                 median_of_passes, bandwidth_gbs=99.0, weight_bytes=2 * 10**9)
    assert section["read_bandwidth_gbs"] == pytest.approx(40.0)  # the probes' median, not the run's one probe
    assert section["servers"]["tokenmill"]["itl_over_bound"] == pytest.approx(2.0)  # median of 2.5 and 1.5
    assert section["servers"]["llama-server"]["itl_over_bound"] == pytest.approx(2.0)
    text = "\n".join(llama_1b.report_lines(section))
    assert "median of 3 probes, one before each server's share of a pass (30.0 to 50.0 GB/s)" in text
    assert "| tokenmill | 100.0 | 2.00× |" in text
