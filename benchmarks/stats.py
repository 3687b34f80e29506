"""Figures of one load level from its request records, and medians across passes."""

import statistics

import numpy as np

from benchmarks.load import RequestRecord


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarise(records: list[RequestRecord], duration_s: float) -> dict:
    ok = [r for r in records if r.ok]
    gaps = [gap for r in ok for gap in r.inter_token_gaps]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "first_error": next((r.error for r in records if not r.ok), None),
        "duration_s": duration_s,
        "output_tok_s": output_tokens / duration_s,
        "requests_s": len(ok) / duration_s,
        "ttft_p50_s": percentile([r.ttft for r in ok], 50),
        "ttft_p99_s": percentile([r.ttft for r in ok], 99),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "e2e_p50_s": percentile([r.latency for r in ok], 50),
    }


def median_of_passes(summaries: list[dict]) -> dict:
    """Median of every numeric figure across passes (errors are summed: one is too many)."""
    merged: dict = {"passes": len(summaries), "errors": sum(s.get("errors", 0) for s in summaries)}
    for key in summaries[0]:
        values = [s[key] for s in summaries if isinstance(s.get(key), (int, float))]
        if key != "errors" and values and len(values) == len(summaries):
            merged[key] = statistics.median(values)
    errors = [s["first_error"] for s in summaries if s.get("first_error")]
    if errors:
        merged["first_error"] = errors[0]
    return merged
