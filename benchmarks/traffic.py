"""`make bench`'s realistic-traffic section: the seeded chat mix at open-loop Poisson rates, and goodput.

Each server, within each pass, gets the same `requests_per_rate` requests of `chat_mix` at every rate,
sent at the same unit-rate Poisson times scaled by the rate (`chat_mix.unit_rate_arrivals`). Markers
name the pass and the rate, not the server, so every server sees the same token counts and no rate
finds an earlier rate's prompts in a prefix cache.

Rates: given (`--traffic-rates 0.5,1,2`), or `auto`: `RATE_FRACTIONS` of a saturation estimate made
once, on the first server of the first pass, before its first rate: a closed loop of `PROBE_CONCURRENCY`
clients over `PROBE_REQUESTS` requests of the mix, completed requests over wall time. The estimate is
low by the last requests' tail (few streams left running), which is why the fractions go past 1; the
same rates then serve every server, so the curves share their x values.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from benchmarks import chat_mix
from benchmarks.goodput import ITL_P99_SLO_S, TTFT_SLO_S, goodput, peak
from benchmarks.load import closed_loop_turns, replay
from benchmarks.stats import median_of_passes, summarise

RATE_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.5)
REQUESTS_PER_RATE = 32
PROBE_CONCURRENCY = 16
PROBE_REQUESTS = 48


@dataclass
class TrafficPlan:
    """What every server's share of the section runs; `rates` is filled by the probe when not given."""

    tokenizer: Any
    requests_per_rate: int = REQUESTS_PER_RATE
    rates: list[float] | None = None
    probe: dict | None = field(default=None)


def parse_rates(text: str) -> list[float] | None:
    """`auto` -> None (estimate them); else comma-separated positive requests per second."""
    if text == "auto":
        return None
    rates = [float(value) for value in text.split(",") if value]
    if not rates or any(rate <= 0 for rate in rates):
        raise ValueError(f"--traffic-rates takes `auto` or positive requests/s, comma-separated; got {text!r}")
    return rates


def rate_key(rate: float) -> str:
    return f"{rate:.3g}"


def _turns(requests: list[chat_mix.ChatRequest]) -> list[tuple[str, str | None, int]]:
    return [(r.prompt, r.system, r.max_tokens) for r in requests]


def estimate_saturation(server, plan: TrafficPlan) -> float:
    """Completed requests/s of a closed loop over the mix: the server's capacity, a little low."""
    requests = chat_mix.build_mix(plan.tokenizer, PROBE_REQUESTS, "probe")
    records, duration = asyncio.run(closed_loop_turns(server.base_url, server.spec.model, PROBE_CONCURRENCY,
                                                      _turns(requests)))
    completed = sum(r.ok for r in records)
    plan.probe = {"server": server.spec.name, "concurrency": PROBE_CONCURRENCY, "requests": PROBE_REQUESTS,
                  "completed": completed, "duration_s": duration, "requests_s": completed / duration}
    if not completed:
        raise RuntimeError(f"the saturation probe on {server.spec.name} completed no request: "
                           f"{next((r.error for r in records if r.error), 'no error text')}")
    return completed / duration


def run_rates(server, plan: TrafficPlan, pass_index: int) -> dict[str, dict]:
    """One server's curve in one pass: per rate, the load summary and the goodput figures."""
    if plan.rates is None:
        saturation = estimate_saturation(server, plan)
        plan.rates = [round(saturation * fraction, 3) for fraction in RATE_FRACTIONS]
        print(f"    saturation estimate on {server.spec.name}: {saturation:.2f} req/s; rates {plan.rates}",
              flush=True)
    arrivals = chat_mix.unit_rate_arrivals(plan.requests_per_rate)
    curve = {}
    for index, rate in enumerate(plan.rates):
        requests = chat_mix.build_mix(plan.tokenizer, plan.requests_per_rate, f"pass {pass_index} rate {index}")
        records, duration = asyncio.run(replay(server.base_url, server.spec.model, _turns(requests),
                                               [at / rate for at in arrivals]))
        curve[rate_key(rate)] = {**summarise(records, duration), **goodput(records, rate)}
        point = curve[rate_key(rate)]
        print(f"    {server.spec.name:>18} {rate:6.3g} req/s: goodput {point['goodput_rps']:.3g} req/s "
              f"({point['slo_attainment']:.0%} in SLO), TTFT p99 {point['ttft_p99_s'] or 0:.2f} s, "
              f"ITL p99 {1000 * (point['itl_p99_s'] or 0):.0f} ms, errors {point['errors']}", flush=True)
    return curve


def summarise_passes(plan: TrafficPlan, passes_by_server: dict[str, list[dict]]) -> dict:
    """Medians per server and rate across passes, with the mix's statistics and the SLO."""
    servers = {}
    for name, passes in passes_by_server.items():
        curves = [p["traffic"] for p in passes if p and p.get("traffic")]
        if curves:
            servers[name] = {key: median_of_passes([curve[key] for curve in curves]) for key in curves[0]}
    return {"rates": plan.rates, "requests_per_rate": plan.requests_per_rate, "probe": plan.probe,
            "slo": {"ttft_s": TTFT_SLO_S, "itl_p99_s": ITL_P99_SLO_S},
            "mix": chat_mix.describe(chat_mix.build_mix(plan.tokenizer, plan.requests_per_rate, "pass 0 rate 0")),
            "system_prompt_tokens": len(plan.tokenizer.encode(chat_mix.SYSTEM_PROMPT, add_special_tokens=False)),
            "seed": chat_mix.SEED, "servers": servers}


def peak_ratio(traffic: dict, ours: str, peers: tuple[str, ...]) -> tuple[float | None, str | None]:
    """Our peak goodput over the better peer's, and that peer's name (None when either is missing)."""
    servers = traffic["servers"]
    present = [peer for peer in peers if peer in servers]
    if ours not in servers or not present:
        return None, None
    better = max(present, key=lambda peer: peak(servers[peer]))
    theirs = peak(servers[better])
    return (peak(servers[ours]) / theirs if theirs else None), better


def plot(traffic: dict, out) -> str:
    """Goodput against offered rate, one line per server, with the line every request meeting the SLO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = "goodput_vs_rate.png"
    figure, axis = plt.subplots(figsize=(6, 4))
    rates = [float(key) for key in map(rate_key, traffic["rates"])]
    axis.plot(rates, rates, linestyle=":", color="grey", label="offered (all in SLO)")
    for server, curve in traffic["servers"].items():
        points = [(float(key), point["goodput_rps"]) for key, point in curve.items() if "goodput_rps" in point]
        if points:
            axis.plot(*zip(*points), marker="o", label=server)
    slo = traffic["slo"]
    axis.set(xlabel="offered rate (requests/s, Poisson)", ylabel="goodput (requests/s in SLO)",
             title=f"Goodput: TTFT ≤ {slo['ttft_s']:g} s, ITL p99 ≤ {1000 * slo['itl_p99_s']:.0f} ms")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / name, dpi=110)
    plt.close(figure)
    return name


def _cell(value, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def report_lines(traffic: dict, out, ours: str, peers: tuple[str, ...]) -> list[str]:
    """The "Realistic traffic" section: the mix, per-rate figures, ratios to the better peer, the plot."""
    mix, slo, probe = traffic["mix"], traffic["slo"], traffic.get("probe")
    lines = ["## Realistic traffic: goodput against offered rate", "",
             f"Seeded chat mix (`benchmarks/chat_mix.py`, seed {traffic['seed']}): {mix['requests']} requests per "
             f"rate; user prompts {mix['prompt_tokens_min']}–{mix['prompt_tokens_max']} tokens (median "
             f"{mix['prompt_tokens_p50']}, mean {mix['prompt_tokens_mean']:.0f}, log-normal); outputs "
             f"{mix['output_tokens_min']}–{mix['output_tokens_max']} tokens (median {mix['output_tokens_p50']}, "
             f"mean {mix['output_tokens_mean']:.0f}, max_tokens with ignore_eos); {mix['with_system_prompt']} of "
             f"them behind one shared system prompt of {traffic['system_prompt_tokens']} tokens. Open-loop Poisson "
             "arrivals, the same schedule scaled at every rate. Goodput: offered rate × share of requests with "
             f"TTFT ≤ {slo['ttft_s']:g} s and their own inter-token p99 ≤ {1000 * slo['itl_p99_s']:.0f} ms "
             "(`benchmarks/goodput.py`)."]
    if probe:
        lines[-1] += (f" Rates: {', '.join(f'{f:g}' for f in RATE_FRACTIONS)} × a saturation estimate of "
                      f"{probe['requests_s']:.2f} req/s ({probe['server']}, closed loop of {probe['concurrency']} "
                      f"clients over {probe['requests']} requests of the mix).")
    lines += ["", f"| rate (req/s) | server | goodput (req/s) | in SLO | TTFT ≤ {slo['ttft_s']:g} s | own ITL p99 ≤ "
              f"{1000 * slo['itl_p99_s']:.0f} ms | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | output tok/s | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key in map(rate_key, traffic["rates"]):
        for server, curve in traffic["servers"].items():
            point = curve.get(key)
            if not point:
                continue
            lines.append(
                f"| {key} | {server} | {_cell(point.get('goodput_rps'))} | {_cell(point.get('slo_attainment'), 100, 0)} % "
                f"| {_cell(point.get('ttft_met'), 100, 0)} % | {_cell(point.get('itl_met'), 100, 0)} % "
                f"| {_cell(point.get('ttft_p50_s'))} / {_cell(point.get('ttft_p99_s'))} "
                f"| {_cell(point.get('itl_p50_s'), 1000, 0)} / {_cell(point.get('itl_p99_s'), 1000, 0)} "
                f"| {_cell(point.get('output_tok_s'), digits=0)} | {point.get('errors', 0)} |")
    ratio, better = peak_ratio(traffic, ours, peers)
    lines.append("")
    if better:
        ours_curve, servers = traffic["servers"][ours], traffic["servers"]
        per_rate = []
        for key in map(rate_key, traffic["rates"]):
            best_peer = max((servers[p].get(key, {}).get("goodput_rps") or 0.0 for p in peers if p in servers))
            mine = ours_curve.get(key, {}).get("goodput_rps")
            per_rate.append(f"{key}: {_cell(mine / best_peer if mine is not None and best_peer else None)}×")
        lines += [f"Peak goodput {ours} / the better peer ({better}): {_cell(ratio)}× "
                  f"({peak(ours_curve):.2f} against {peak(servers[better]):.2f} req/s). Per rate, against the "
                  f"better peer at that rate: {'; '.join(per_rate)}.", ""]
    lines += [f"![goodput]({plot(traffic, out)})", ""]
    return lines

