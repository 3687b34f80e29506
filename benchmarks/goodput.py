"""Goodput: requests per second that meet the latency SLO, at an offered Poisson rate.

A request meets the SLO when it succeeded, its first token came within `TTFT_SLO_S` of sending, and the
99th percentile of its own inter-token gaps is at most `ITL_P99_SLO_S` (gaps between streamed chunks
that carried text; every server here streams one token a chunk). An error, or a request that streamed
a single chunk, misses it.

Goodput at offered rate r is r times the share of the sent requests that met the SLO. Every rate replays
the same requests at the same arrival times scaled, so the share is what differs; taking r rather than
sent / wall time keeps the drain of the last requests and the Poisson draw's own count out of the figure.
"""

from __future__ import annotations

from benchmarks.load import RequestRecord
from benchmarks.stats import percentile

TTFT_SLO_S = 1.0
ITL_P99_SLO_S = 0.150


def meets_slo(record: RequestRecord, ttft_s: float = TTFT_SLO_S, itl_p99_s: float = ITL_P99_SLO_S) -> bool:
    if not record.ok or len(record.token_times) < 2:
        return False
    return record.ttft <= ttft_s and percentile(record.inter_token_gaps, 99) <= itl_p99_s


def goodput(records: list[RequestRecord], offered_rate: float) -> dict:
    """The SLO figures of one rate's run: share meeting it, goodput, and each condition's share alone."""
    sent = len(records)
    ok = [r for r in records if r.ok and len(r.token_times) >= 2]
    met = sum(meets_slo(r) for r in records)
    return {
        "offered_rate": offered_rate,
        "slo_attainment": met / sent if sent else 0.0,
        "goodput_rps": offered_rate * met / sent if sent else 0.0,
        "ttft_met": sum(r.ttft <= TTFT_SLO_S for r in ok) / sent if sent else 0.0,
        "itl_met": sum(percentile(r.inter_token_gaps, 99) <= ITL_P99_SLO_S for r in ok) / sent if sent else 0.0,
    }


def peak(curve: dict[str, dict]) -> float:
    """The highest goodput over a server's rates (its curve's top)."""
    return max((point.get("goodput_rps") or 0.0 for point in curve.values()), default=0.0)
