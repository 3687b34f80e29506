"""Q4_K_M at batch 1: tokenmill against llama-server on the same Q4_K_M file (issue #21's acceptance: ITL p50
no more than llama-server's). The file is llama-quantize's of the embedded model (`benchmarks.quantized_files`);
the two servers alternate within each pass, one request stream at a time (c=1), like the main table."""

from __future__ import annotations

from typing import Callable

from benchmarks.quantized_files import linear_types, quantized_file
from benchmarks.specs import llama_server_spec, tokenmill_spec
from benchmarks.stats import median_of_passes

GGML_TYPE = "Q4_K_M"
LEVEL = "1"


def run(passes: int, run_server: Callable) -> dict:
    """`run_server(spec, levels)` runs one server through the load levels (benchmarks.run's, bound to its logs)."""
    path = quantized_file(GGML_TYPE)
    raw: dict[str, list[dict]] = {"tokenmill": [], "llama-server": []}
    for index in range(passes):
        print(f"  {GGML_TYPE} pass {index + 1}/{passes}", flush=True)
        specs = {"tokenmill": tokenmill_spec(path), "llama-server": llama_server_spec(path, 1)}
        order = list(specs) if index % 2 == 0 else list(reversed(specs))  # who goes first alternates
        for name in order:
            raw[name].append(run_server(specs[name], [LEVEL])["levels"][LEVEL])
    return {"file": path.name, "matrices": dict(linear_types(path)),
            "servers": {name: median_of_passes(figures) for name, figures in raw.items()}, "raw": raw}


def report_lines(figures: dict) -> list[str]:
    ours, theirs = (figures["servers"][name].get("itl_p50_s") for name in ("tokenmill", "llama-server"))
    ratio = ours / theirs if ours and theirs else None
    matrices = ", ".join(f"{count} {name}" for name, count in sorted(figures["matrices"].items()))
    lines = [f"## {GGML_TYPE} at batch 1: tokenmill vs llama-server on the same file", "",
             f"`{figures['file']}` (llama-quantize of the embedded model; matrices: {matrices}). Streaming chat at "
             "c=1, medians over the passes.", "",
             "| server | ITL p50 (ms) | output tok/s |", "|---|---|---|"]
    for name, entry in figures["servers"].items():
        itl = entry.get("itl_p50_s")
        lines.append(f"| {name} | {'–' if itl is None else f'{1000 * itl:.1f}'} | {entry.get('output_tok_s', 0):.1f} |")
    holds = "–" if ratio is None else ("holds" if ratio <= 1 else "does not hold")
    lines += ["", f"tokenmill / llama-server ITL p50: {'–' if ratio is None else f'{ratio:.2f}'}× "
              f"(acceptance ≤ 1: {holds}).", ""]
    return lines
