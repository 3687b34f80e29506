"""`make bench`'s fixed load for a few servers and serving flags, side by side: an A/B of one lever.

    python -m benchmarks.fixed_load_ab [--passes 2] [--levels 16,64] [--variant NAME='SERVE FLAGS' ...] [--vllm]

Each variant is `tokenmill serve` with `make serve`'s defaults plus its flags (default: `default=''`);
`--vllm` adds vLLM's CPU build as `make bench` tunes it. Passes alternate the servers (A B C, C B A, ...),
one up at a time, and each level runs `make bench`'s closed loop (its prompts, 128 new tokens,
`requests_for(c)` requests); medians over passes are printed, and each pass's ratios to the first server.
Before each server's share the machine is probed (bf16 matmul, read bandwidth): on a shared host its
compute moved threefold within an hour, and the servers did not slow alike (benchmarks/NOTES.md section 39),
so a ratio is read beside the probes of its pass. Used for benchmarks/NOTES.md sections 23-24 and 39.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import tempfile
from pathlib import Path

from benchmarks.load import closed_loop
from benchmarks.machine import bf16_matmul_gflops, read_bandwidth_gbs
from benchmarks.run import requests_for
from benchmarks.servers import RunningServer, ServerSpec
from benchmarks.setup_vllm import export_hf_folder, install_vllm
from benchmarks.specs import THREADS, tokenmill_spec, vllm_spec
from benchmarks.stats import summarise


def _spec(name: str, flags: str | None) -> ServerSpec:
    if flags is None:
        from tokenmill.loader import default_model_path

        return vllm_spec(export_hf_folder(Path(default_model_path())))
    spec = tokenmill_spec()
    spec.command += shlex.split(flags)
    spec.name = f"tokenmill-{name}"
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--levels", default="16,64")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS")
    parser.add_argument("--vllm", action="store_true", help="add vLLM (installed under the bench cache)")
    args = parser.parse_args(argv)
    variants: dict[str, str | None] = dict(v.split("=", 1) for v in args.variant) or {"default": ""}
    if args.vllm:
        install_vllm()
        variants["vllm"] = None
    levels = [int(level) for level in args.levels.split(",") if level]
    results: dict[str, dict[int, list[float]]] = {name: {level: [] for level in levels} for name in variants}
    logs = Path(tempfile.mkdtemp(prefix="tokenmill-ab-"))
    for index in range(args.passes):
        order = list(variants) if index % 2 == 0 else list(reversed(variants))
        for name in order:
            print(f"pass {index + 1} {name:>12}: machine {bf16_matmul_gflops(THREADS):,.0f} GFLOP/s bf16 matmul, "
                  f"{read_bandwidth_gbs(THREADS):.1f} GB/s read", flush=True)
            spec = _spec(name, variants[name])
            server = RunningServer(spec, logs)
            try:
                for level in levels:
                    records, duration = asyncio.run(closed_loop(server.base_url, spec.model, level, requests_for(level)))
                    figures = summarise(records, duration)
                    results[name][level].append(figures["output_tok_s"])
                    print(f"pass {index + 1} {name:>12} c={level}: {figures['output_tok_s']:.1f} tok/s, ITL p50 "
                          f"{1000 * (figures['itl_p50_s'] or 0):.1f} ms, TTFT p99 {figures['ttft_p99_s'] or 0:.2f} s, "
                          f"errors {figures['errors']}", flush=True)
            finally:
                server.stop()
    first = next(iter(variants))
    for name, by_level in results.items():
        for level, values in by_level.items():
            ratios = "" if name == first else "; per pass / " + first + ": " + ", ".join(
                f"{v / base:.2f}x" for v, base in zip(values, results[first][level]))
            print(f"{name} c={level}: median {statistics.median(values):.1f} tok/s "
                  f"({', '.join(f'{v:.1f}' for v in values)}){ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
