"""`make bench`'s speculative-decoding section: c=1 decoding with `--speculate 0` and `--speculate 3` side by side.

The engine runs in process on the embedded SmolLM2, greedy, over chat prompts of the bench set and a
copy-heavy one (repeat a text back). Each prompt runs with each setting in turn, a pass after another, so
both settings share the machine's noise. Per setting: the inter-token latency of each request (its first
token to its last, over the tokens in between; medians over requests and passes), the tokens a decoding
sequence got per forward (the engine's counters), and whether its tokens equal the plain run's. In
process, because at c=1 the step is the engine's: HTTP would add the same to both settings.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.prompts import _PARAGRAPH, SHORT_PROMPTS

SETTINGS = (0, 3)
MAX_NEW_TOKENS = 96
PROMPTS = {"chat": SHORT_PROMPTS[:4], "copy": ["Repeat the following text exactly, word for word.\n\n" + _PARAGRAPH * 2]}


def _timed(engine, prompt_ids: list[int]) -> tuple[list[int], float | None]:
    """The request's tokens and its inter-token latency, stepping the engine alone."""
    from tokenmill.sampling_params import SamplingParams

    engine.add_request("bench", prompt_ids, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    tokens, first, last, after_first = [], None, None, 0
    while engine.has_unfinished():
        for out in engine.step():
            if not out.new_tokens:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                after_first += len(out.new_tokens)
            last = now
            tokens += [t.id for t in out.new_tokens]
    return tokens, (last - first) / after_first if after_first else None


def run(passes: int) -> dict:
    from tokenmill.engine import Engine, EngineConfig

    engines = {s: Engine(EngineConfig(speculate=s, progress=False)) for s in SETTINGS}
    tokenizer = engines[0].tokenizer
    # Keyed by the setting as text, as the figures read back from latest.json are.
    figures = {kind: {str(s): {"itl_s": [], "identical": True} for s in SETTINGS} for kind in PROMPTS}
    counters = {kind: {s: [0, 0] for s in SETTINGS} for kind in PROMPTS}  # decode forwards, decode tokens
    for pass_index in range(passes):
        # Alternate which setting runs first, so load from elsewhere on the machine falls on both alike.
        order = list(engines.items()) if pass_index % 2 == 0 else list(reversed(engines.items()))
        for kind, prompts in PROMPTS.items():
            for text in prompts:
                chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=False)
                ids = tokenizer(chat, add_special_tokens=False).input_ids
                outputs = {}
                for s, engine in order:
                    before = engine.speculation.copy()
                    tokens, itl = _timed(engine, list(ids))
                    stats = engine.speculation
                    counters[kind][s][0] += stats.num_decode_forwards - before.num_decode_forwards
                    counters[kind][s][1] += stats.num_decode_tokens - before.num_decode_tokens
                    outputs[s] = tokens
                    if itl is not None:
                        figures[kind][str(s)]["itl_s"].append(itl)
                for s in SETTINGS:
                    figures[kind][str(s)]["identical"] &= outputs[s] == outputs[SETTINGS[0]]
    for kind in PROMPTS:
        for s in SETTINGS:
            row = figures[kind][str(s)]
            row["itl_p50_s"] = statistics.median(row.pop("itl_s"))
            forwards, produced = counters[kind][s]
            row["tokens_per_forward"] = produced / forwards if forwards else None
    return {"max_new_tokens": MAX_NEW_TOKENS, "passes": passes, "settings": list(SETTINGS), "prompts": figures}


def report_lines(results: dict) -> list[str]:
    base, spec = (str(s) for s in results["settings"])
    lines = ["## Speculative decoding (`--speculate`), c=1", "",
             f"Greedy, {results['max_new_tokens']} new tokens, {results['passes']} pass(es), in process "
             "(`benchmarks/speculation.py`); ITL: a request's first token to its last, per token.", "",
             f"| prompts | ITL p50 speculate {base} | ITL p50 speculate {spec} | ratio | tokens/forward {spec} "
             "| output identical |", "|---|---|---|---|---|---|"]
    for kind, row in results["prompts"].items():
        plain, fast = row[base], row[spec]
        lines.append(f"| {kind} | {1000 * plain['itl_p50_s']:.1f} ms | {1000 * fast['itl_p50_s']:.1f} ms | "
                     f"{fast['itl_p50_s'] / plain['itl_p50_s']:.2f}× | {fast['tokens_per_forward']:.2f} | "
                     f"{'yes' if fast['identical'] else 'NO'} |")
    return lines + [""]


if __name__ == "__main__":  # the section alone: python -m benchmarks.speculation [passes]
    import json
    import sys

    figures = run(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(json.dumps(figures, indent=2))
    print("\n".join(report_lines(figures)))
