"""`make bench`'s structured-output section: c=16 decode throughput, every request JSON-constrained against none.

The engine runs in process on the embedded SmolLM2 with 16 requests always in flight (a finished one is
replaced at once) for a fixed window; output tokens per second over the window. The constrained window
gives each request one of a few JSON schemas (compiled once, cached by text, as in serving); the plain
window the same prompts without one. Each pass runs both, in alternating order, so they share the
machine's noise; the report gives medians and their ratio (issue #18's goal: within 10 %).
"""

from __future__ import annotations

import itertools
import statistics
import time

from benchmarks.prompts import SHORT_PROMPTS

CONCURRENCY = 16
MAX_NEW_TOKENS = 64
WINDOW_S = 30.0
_NAME = {"type": "string", "maxLength": 20}
SCHEMAS = [
    {"type": "object", "required": ["name", "age", "city"], "additionalProperties": False,
     "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "city": _NAME}},
    {"type": "object", "required": ["sky", "warm"], "additionalProperties": False,
     "properties": {"sky": {"enum": ["sunny", "cloudy", "rainy"]}, "warm": {"type": "boolean"}}},
    {"type": "object", "required": ["colours"], "additionalProperties": False,
     "properties": {"colours": {"type": "array", "items": _NAME, "minItems": 1, "maxItems": 5}}},
    {"type": "object", "required": ["title", "year", "tags"], "additionalProperties": False,
     "properties": {"title": {"type": "string", "maxLength": 40}, "year": {"type": "integer"},
                    "tags": {"type": "array", "items": _NAME}}},
]


def _tokens_per_s(engine, prompts: list[list[int]], grammars: list, window_s: float) -> float:
    """Output tokens per second with CONCURRENCY requests kept in flight for `window_s`."""
    from tokenmill.sampling_params import SamplingParams

    ids = itertools.count()

    def submit() -> None:
        i = next(ids)
        grammar = grammars[i % len(grammars)] if grammars else None
        engine.add_request(f"bench-{i}", prompts[i % len(prompts)],
                           SamplingParams(max_new_tokens=MAX_NEW_TOKENS, grammar=grammar))

    for _ in range(CONCURRENCY):
        submit()
    tokens, started = 0, time.perf_counter()
    while time.perf_counter() - started < window_s:
        for out in engine.step():
            tokens += len(out.new_tokens)
            if out.finished:
                submit()
    elapsed = time.perf_counter() - started
    for request_id in engine.unfinished_request_ids():
        engine.abort(request_id)
    return tokens / elapsed


def run(passes: int, window_s: float = WINDOW_S) -> dict:
    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.grammar import GrammarSpec

    engine = Engine(EngineConfig(progress=False))
    tokenizer = engine.tokenizer
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": f"{text} Answer in JSON."}],
                                                       add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False).input_ids for text in SHORT_PROMPTS]
    grammars = [GrammarSpec.json_schema(schema) for schema in SCHEMAS]
    for grammar in grammars:  # compiled before the clock starts, as a served schema is after its first use
        engine.grammars.submit(grammar).result()
    _tokens_per_s(engine, prompts, grammars, 3.0)  # warm-up of both paths
    figures = {"plain": [], "json": []}
    for index in range(passes):
        order = ("plain", "json") if index % 2 == 0 else ("json", "plain")
        for kind in order:
            figures[kind].append(_tokens_per_s(engine, prompts, grammars if kind == "json" else [], window_s))
    engine.grammars.shutdown()
    return {"concurrency": CONCURRENCY, "max_new_tokens": MAX_NEW_TOKENS, "window_s": window_s, "passes": passes,
            "tokens_per_s": {kind: statistics.median(values) for kind, values in figures.items()},
            "all_passes": figures}


def report_lines(results: dict) -> list[str]:
    plain, constrained = results["tokens_per_s"]["plain"], results["tokens_per_s"]["json"]
    return ["## Structured output: every request JSON-constrained, c=16", "",
            f"{results['concurrency']} requests in flight for {results['window_s']:.0f} s windows, up to "
            f"{results['max_new_tokens']} new tokens each, {results['passes']} pass(es), in process "
            "(`benchmarks/structured.py`); medians.", "",
            "| requests | output tok/s | ratio to plain |", "|---|---|---|",
            f"| plain | {plain:.1f} | 1.00 |",
            f"| JSON schema (grammar) | {constrained:.1f} | {constrained / plain:.2f} |", ""]


if __name__ == "__main__":  # the section alone: python -m benchmarks.structured [passes] [window_s]
    import json
    import sys

    figures = run(int(sys.argv[1]) if len(sys.argv) > 1 else 1, float(sys.argv[2]) if len(sys.argv) > 2 else WINDOW_S)
    print(json.dumps(figures, indent=2))
    print("\n".join(report_lines(figures)))
