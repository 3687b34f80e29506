"""The realistic-traffic section: the seeded chat mix, its arrivals, and goodput on synthetic timings."""

import statistics

import pytest

from benchmarks import chat_mix, traffic
from benchmarks.goodput import goodput, meets_slo
from benchmarks.load import RequestRecord


def test_the_seeded_mix_has_the_asked_shape() -> None:
    shapes = chat_mix.sample_shapes(3000)
    assert shapes == chat_mix.sample_shapes(3000) and shapes != chat_mix.sample_shapes(3000, seed=chat_mix.SEED + 9)
    prompts = [s.prompt_tokens for s in shapes]
    outputs = [s.max_tokens for s in shapes]
    # Log-normal, clipped: both ends reached, medians where the module says.
    assert (min(prompts), max(prompts)) == chat_mix.PROMPT_TOKENS
    assert (min(outputs), max(outputs)) == chat_mix.OUTPUT_TOKENS
    assert abs(statistics.median(prompts) / chat_mix.PROMPT_MEDIAN - 1) < 0.1
    assert abs(statistics.median(outputs) / chat_mix.OUTPUT_MEDIAN - 1) < 0.1
    assert statistics.mean(prompts) > statistics.median(prompts)  # the long tail
    assert sum(s.with_system for s in shapes) == 1000


def test_mix_text_has_the_drawn_token_counts(bpe_tokenizer) -> None:
    requests = chat_mix.build_mix(bpe_tokenizer, 30, "pass 0 rate 0")
    shapes = chat_mix.sample_shapes(30)
    for request, shape in zip(requests, shapes):
        assert request.prompt_tokens == len(bpe_tokenizer.encode(request.prompt, add_special_tokens=False))
        assert abs(request.prompt_tokens - shape.prompt_tokens) <= 2  # a decoded window re-tokenizes at its edges
        assert request.max_tokens == shape.max_tokens
        assert (request.system == chat_mix.SYSTEM_PROMPT) == shape.with_system
    assert sum(r.system is not None for r in requests) == 10
    assert len({r.prompt for r in requests}) == 30
    again = chat_mix.build_mix(bpe_tokenizer, 30, "pass 0 rate 0")
    other_rate = chat_mix.build_mix(bpe_tokenizer, 30, "pass 0 rate 1")
    assert again == requests
    # Another run's prompts share no first line with this run's: no prefix cache hit across rates.
    assert not {r.prompt.split("\n")[0] for r in requests} & {r.prompt.split("\n")[0] for r in other_rate}
    assert chat_mix.describe(requests)["with_system_prompt"] == 10


def test_arrivals_are_a_unit_rate_poisson_process() -> None:
    times = chat_mix.unit_rate_arrivals(4000)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0.0 and all(gap > 0 for gap in gaps)
    assert abs(statistics.mean(gaps) - 1) < 0.05
    assert abs(statistics.stdev(gaps) - 1) < 0.08  # exponential: the spread equals the mean
    assert times == chat_mix.unit_rate_arrivals(4000)


def _record(ttft: float, gaps: list[float], ok: bool = True) -> RequestRecord:
    times = [ttft]
    for gap in gaps:
        times.append(times[-1] + gap)
    return RequestRecord(ok=ok, sent=0.0, token_times=times if ok else [], output_tokens=len(times),
                         finished=times[-1])


def test_goodput_counts_requests_meeting_both_bounds() -> None:
    fast = _record(0.2, [0.01] * 100)
    late_first_token = _record(1.5, [0.01] * 100)
    one_stall = _record(0.2, [0.01] * 99 + [0.4])  # one slow gap in 100: p99 stays under 150 ms
    two_stalls = _record(0.2, [0.01] * 98 + [0.4, 0.4])  # two: p99 is a stall
    failed = RequestRecord(ok=False, error="HTTP 500")
    assert [meets_slo(r) for r in (fast, late_first_token, one_stall, two_stalls, failed)] == [
        True, False, True, False, False]
    figures = goodput([fast, late_first_token, one_stall, two_stalls, failed], offered_rate=2.0)
    assert figures["slo_attainment"] == pytest.approx(0.4)
    assert figures["goodput_rps"] == pytest.approx(0.8)  # 2 req/s offered, 2 of 5 in SLO
    assert figures["ttft_met"] == pytest.approx(0.6) and figures["itl_met"] == pytest.approx(0.6)


def _curve(goodputs: dict[str, float]) -> dict:
    return {rate: {"goodput_rps": g, "slo_attainment": g / float(rate), "ttft_met": 1.0, "itl_met": 1.0,
                   "ttft_p50_s": 0.3, "ttft_p99_s": 0.9, "itl_p50_s": 0.03, "itl_p99_s": 0.1,
                   "output_tok_s": 100.0, "errors": 0} for rate, g in goodputs.items()}


def test_report_section_gives_the_ratio_to_the_better_peer(bpe_tokenizer, tmp_path) -> None:
    plan = traffic.TrafficPlan(bpe_tokenizer, requests_per_rate=9, rates=[0.5, 1.0, 2.0])
    section = traffic.summarise_passes(plan, {
        "tokenmill": [{"traffic": _curve({"0.5": 0.5, "1": 1.0, "2": 1.5})}],
        "llama-server": [{"traffic": _curve({"0.5": 0.5, "1": 0.5, "2": 0.2})}],
        "vllm": [{"traffic": _curve({"0.5": 0.5, "1": 0.9, "2": 0.6})}, {"traffic": _curve({"0.5": 0.5, "1": 0.9, "2": 1.0})}],
    })
    assert section["servers"]["vllm"]["2"]["goodput_rps"] == pytest.approx(0.8)  # median of two passes
    assert traffic.peak_ratio(section, "tokenmill", ("llama-server", "vllm")) == (pytest.approx(1.5 / 0.9), "vllm")
    text = "\n".join(traffic.report_lines(section, tmp_path, "tokenmill", ("llama-server", "vllm")))
    assert "Peak goodput tokenmill / the better peer (vllm): 1.67×" in text
    assert "2: 1.88×" in text  # 1.5 against vLLM's 0.8 at 2 req/s
    assert "| 2 | llama-server | 0.20 |" in text
    assert (tmp_path / "goodput_vs_rate.png").stat().st_size > 0


def test_rates_are_auto_or_positive() -> None:
    assert traffic.parse_rates("auto") is None
    assert traffic.parse_rates("0.5,1,2") == [0.5, 1.0, 2.0]
    with pytest.raises(ValueError, match="positive"):
        traffic.parse_rates("1,-2")
