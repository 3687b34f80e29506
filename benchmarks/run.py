"""`make bench`: tokenmill, llama-server and vLLM side by side on the same model and load; writes the report.

Servers alternate within each pass (A B C, A B C, ...), one up at a time, and the report quotes medians
across passes, because this machine is shared and noisy. `tokenmill-tp` is the tensor-parallel section
(1 shard against 2, `benchmarks/tensor_parallel.py`); selected alone (`--servers tokenmill-tp`) it
writes TENSOR_PARALLEL.md and tensor_parallel.json, leaving the full run's REPORT.md and latest.json.
"""

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks import (gguf_itl, llama_1b, report, routing, speculation, startup, structured, tensor_parallel,
                        traffic)
from benchmarks.hf_baseline import transformers_baseline
from benchmarks.load import closed_loop, open_loop
from benchmarks.machine import describe_machine, read_bandwidth_gbs
from benchmarks.quality import perplexities, safetensors_checkpoints
from benchmarks.quantized_files import bf16_file, quantized_files
from benchmarks.servers import RunningServer, ServerSpec
from benchmarks.setup_llama_server import build_llama_server
from benchmarks.setup_vllm import export_hf_folder, install_vllm
from benchmarks.specs import THREADS, llama_server_spec, tokenmill_spec, vllm_spec
from benchmarks.stats import median_of_passes, summarise

SERVERS = ("tokenmill", "llama-server", "vllm", "tokenmill-tp")
TENSOR_PARALLEL = "tokenmill-tp"
POISSON_RATE = 1.5  # requests/s: ~190 output tok/s offered, between the peers' batch-1 and saturated rates
TRAFFIC_SLOTS = 16  # llama-server's slots for the chat mix; requests beyond them wait in its queue
ONE_B_SERVERS = ("tokenmill", "llama-server", "vllm")


def requests_for(concurrency: int) -> int:
    """Enough requests that every client runs at least twice (four alone, to cover a long prompt)."""
    return max(4, 2 * concurrency)


def run_levels(server: RunningServer, levels: list[str], poisson_requests: int) -> dict:
    results = {}
    for level in levels:
        if level == "poisson":
            records, duration = asyncio.run(open_loop(server.base_url, server.spec.model, POISSON_RATE,
                                                      poisson_requests))
        else:
            concurrency = int(level)
            records, duration = asyncio.run(closed_loop(server.base_url, server.spec.model, concurrency,
                                                        requests_for(concurrency)))
        results[level] = summarise(records, duration)
        print(f"    {server.spec.name:>18} {level:>7}: {results[level]['output_tok_s']:7.1f} tok/s, "
              f"ITL p50 {1000 * (results[level]['itl_p50_s'] or 0):6.1f} ms, "
              f"TTFT p99 {results[level]['ttft_p99_s'] or 0:6.2f} s, errors {results[level]['errors']}",
              flush=True)
    return results


def run_server(spec: ServerSpec, levels: list[str], poisson_requests: int, log_dir: Path,
               traffic: Callable[[RunningServer], dict] | None = None) -> dict:
    """Start `spec`, run the fixed load `levels`, then `traffic` (the realistic-traffic curve) if given, stop."""
    print(f"  starting {spec.name}", flush=True)
    server = RunningServer(spec, log_dir)
    curve = None
    try:
        print(f"    {spec.name} answered after {server.startup_s:.1f} s", flush=True)
        figures = run_levels(server, levels, poisson_requests)
        if traffic is not None:
            curve = traffic(server)
    finally:
        server.stop()
    result = {"startup_s": server.startup_s, "peak_rss_gib": server.peak_rss_bytes / 2**30, "levels": figures}
    if curve is not None:
        result["traffic"] = curve
    return result


def _merge(result: dict | None, more: dict) -> dict:
    """Two llama-server runs of one pass as one: levels and traffic together, the higher peak RSS."""
    if result is None:
        return more
    result["levels"].update(more["levels"])
    if "traffic" in more:
        result["traffic"] = more["traffic"]
    result["peak_rss_gib"] = max(result["peak_rss_gib"], more["peak_rss_gib"])
    return result


def run_llama_server(make_spec: Callable[[int], ServerSpec], levels: list[str],
                     run: Callable[[ServerSpec, list[str]], dict]) -> dict | None:
    """llama-server gets as many slots as the concurrency needs: one server (16 slots) for the levels up to
    16 and the Poisson level, one more per larger level."""
    small = [lv for lv in levels if lv == "poisson" or int(lv) <= 16]
    large = [lv for lv in levels if lv not in small]
    result = run(make_spec(16), small) if small else None
    for level in large:
        result = _merge(result, run(make_spec(int(level)), [level]))
    return result


def run_pass(name: str, levels: list[str], gguf: Path, hf_folder: Path | None, poisson_requests: int,
             log_dir: Path, traffic: Callable[[RunningServer], dict] | None = None) -> dict:
    """One server's share of a pass: the fixed load, then the realistic-traffic curve when `traffic` is given."""
    def run(spec: ServerSpec, lvs: list[str], curve: Callable[[RunningServer], dict] | None = None) -> dict:
        return run_server(spec, lvs, poisson_requests, log_dir, curve)

    if name == TENSOR_PARALLEL:
        return tensor_parallel.run_pass(run)
    if name == "tokenmill":
        return run(tokenmill_spec(), levels, traffic)
    if name.startswith("vllm"):
        return run(vllm_spec(hf_folder, bind_threads=name == "vllm"), levels, traffic)
    result = run_llama_server(lambda slots: llama_server_spec(gguf, slots), levels, run)
    if traffic is not None:  # the mix needs 4k tokens a slot: its own server
        result = _merge(result, run(llama_server_spec(gguf, TRAFFIC_SLOTS, slot_context=4096), [], traffic))
    return result


def run_1b_passes(servers: list[str], levels: list[str], passes: int, log_dir: Path) -> list[dict]:
    """The 1B-class section's passes, servers alternating within each (`benchmarks/llama_1b.py`)."""
    def run(spec: ServerSpec, lvs: list[str]) -> dict:
        return run_server(spec, lvs, 0, log_dir)

    results = []
    for index in range(passes if servers and levels else 0):
        print(f"1B-class model ({llama_1b.SHAPE}, random bf16 weights): pass {index + 1}/{passes}", flush=True)
        results.append(llama_1b.run_pass(servers, levels, run,
                                         lambda make_spec, lvs: run_llama_server(make_spec, lvs, run),
                                         lambda: read_bandwidth_gbs(THREADS)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--levels", default="1,4,16,64,poisson")
    parser.add_argument("--poisson-requests", type=int, default=48)
    parser.add_argument("--no-vllm-default-bind", action="store_true",
                        help="skip the extra vLLM pass with its default thread binding")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-quality", action="store_true", help="skip the perplexity of each serving mode")
    parser.add_argument("--no-gguf-types", action="store_true",
                        help="skip the GGUF types made by llama-quantize: their perplexity rows and the Q4_K_M "
                             "batch-1 ITL against llama-server")
    parser.add_argument("--no-safetensors-formats", action="store_true",
                        help="skip the perplexity rows of the pre-quantized safetensors checkpoints (GPTQ, AWQ, "
                             "fp8, compressed-tensors) made from the embedded model")
    parser.add_argument("--no-speculation", action="store_true", help="skip --speculate 0 against 3 at c=1")
    parser.add_argument("--no-structured", action="store_true",
                        help="skip c=16 throughput with every request JSON-constrained against none")
    parser.add_argument("--no-routing", action="store_true",
                        help="skip prefix-aware against least-loaded routing over 2 model-server replicas")
    parser.add_argument("--no-startup", action="store_true",
                        help="skip make serve's start-up to the first answer, with an empty cache against a filled one")
    parser.add_argument("--no-traffic", action="store_true",
                        help="skip the realistic traffic: the seeded chat mix at open-loop Poisson rates, goodput")
    parser.add_argument("--traffic-rates", default="auto",
                        help="requests/s, comma-separated, or auto: fractions of a saturation estimate")
    parser.add_argument("--traffic-requests", type=int, default=traffic.REQUESTS_PER_RATE,
                        help="requests of the chat mix at each rate")
    parser.add_argument("--no-1b", action="store_true",
                        help="skip the 1B-class model (Llama-3.2-1B's shape, random weights) on every server")
    parser.add_argument("--levels-1b", default=",".join(llama_1b.LEVELS), help="the 1B section's concurrencies")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    levels = [lv for lv in args.levels.split(",") if lv]
    peers_run = any(name != TENSOR_PARALLEL for name in servers)
    traffic_plan = None
    if peers_run and not args.no_traffic:
        from tokenmill.loader import load_tokenizer

        traffic_plan = traffic.TrafficPlan(load_tokenizer(), args.traffic_requests,
                                           traffic.parse_rates(args.traffic_rates))

    from tokenmill.loader import default_model_path

    gguf = Path(default_model_path())
    if "llama-server" in servers:
        build_llama_server()
    hf_folder = export_hf_folder(gguf) if peers_run else None
    if "vllm" in servers:
        install_vllm()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = Path.home() / ".cache" / "tokenmill-bench" / "logs" / stamp
    results: dict = {"started": stamp, "machine": describe_machine(THREADS), "passes": args.passes,
                     "levels": levels, "servers": {}, "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]])}
    if peers_run:
        results["model_bf16_bytes"] = sum(f.stat().st_size for f in hf_folder.glob("*.safetensors"))
        results["model_served_bytes"] = report.served_weight_bytes()
    print(f"machine: {results['machine']}", flush=True)
    raw: dict[str, list[dict]] = {name: [] for name in servers}
    for index in range(args.passes):
        print(f"pass {index + 1}/{args.passes}", flush=True)
        curve = (lambda server, index=index: traffic.run_rates(server, traffic_plan, index)) if traffic_plan else None
        for name in servers:
            raw[name].append(run_pass(name, levels, gguf, hf_folder, args.poisson_requests, log_dir, curve))
    one_b = [name for name in servers if name in ONE_B_SERVERS] if not args.no_1b else []
    one_b_passes = run_1b_passes(one_b, [lv for lv in args.levels_1b.split(",") if lv], args.passes, log_dir)
    if "vllm" in servers and not args.no_vllm_default_bind:
        print("vLLM with its default thread binding (one pass)", flush=True)
        raw["vllm-default-bind"] = [run_pass("vllm-default-bind", [lv for lv in levels if lv in ("1", "16")],
                                             gguf, hf_folder, args.poisson_requests, log_dir)]
    args.out.mkdir(parents=True, exist_ok=True)
    if TENSOR_PARALLEL in raw:
        results["tensor_parallel"] = tensor_parallel.summarise(raw.pop(TENSOR_PARALLEL), median_of_passes)
        print("tensor-parallel micro-benchmark (decode steps in process)", flush=True)
        results["tensor_parallel"]["micro"] = tensor_parallel.run_micro(args.passes)
    if traffic_plan is not None:
        results["traffic"] = traffic.summarise_passes(traffic_plan, raw)
    if one_b_passes:
        results["model_1b"] = llama_1b.summarise(one_b_passes, median_of_passes, results["machine"]["read_bandwidth_gbs"],
                                                 llama_1b.decode_weight_bytes(llama_1b.model_folder()))
    for name, passes in raw.items():
        passes = [p for p in passes if p is not None]  # None: no fixed-load level ran (`--levels ""`)
        if not passes:
            continue
        results["servers"][name] = {
            "startup_s": median_of_passes([{"v": p["startup_s"]} for p in passes])["v"],
            "peak_rss_gib": max(p["peak_rss_gib"] for p in passes),
            "levels": {lv: median_of_passes([p["levels"][lv] for p in passes])
                       for lv in passes[0]["levels"]},
            "raw": passes,
        }
    if not peers_run:
        (args.out / "tensor_parallel.json").write_text(json.dumps(results, indent=2))
        print(f"report: {report.write_tensor_parallel(results, args.out)}", flush=True)
        return 0
    if not args.no_transformers:
        print("transformers generate baseline", flush=True)
        results["transformers"] = transformers_baseline(hf_folder, THREADS)
    if not args.no_gguf_types and "llama-server" in servers and "tokenmill" in servers:
        print(f"{gguf_itl.GGML_TYPE}: tokenmill against llama-server at c=1 on the same file", flush=True)
        results["gguf_itl"] = gguf_itl.run(args.passes, lambda spec, lvs: run_server(spec, lvs, args.poisson_requests,
                                                                                   log_dir))
    if not args.no_quality:
        print("perplexity of each serving mode on the fixed text", flush=True)
        gguf_files = None if args.no_gguf_types else {"BF16": bf16_file(), **quantized_files(threads=THREADS)}
        checkpoints = None if args.no_safetensors_formats else safetensors_checkpoints()
        results["quality"] = perplexities(THREADS, gguf_files, checkpoints)
    if not args.no_speculation and "tokenmill" in servers:
        print("speculative decoding: --speculate 0 against 3 at c=1, in process", flush=True)
        results["speculation"] = speculation.run(args.passes)
    if not args.no_structured and "tokenmill" in servers:
        print("structured output: c=16 with every request JSON-constrained against none, in process", flush=True)
        results["structured"] = structured.run(args.passes)
    if not args.no_routing and "tokenmill" in servers:
        print("routing: prefix-aware against least-loaded, 2 model-server replicas and a router per mode", flush=True)
        results["routing"] = routing.run(args.passes, log_dir)
    if not args.no_startup and "tokenmill" in servers:
        print("start-up: make serve to its first answer, an empty cache dir against a filled one", flush=True)
        results["startup"] = startup.run(args.passes)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2))
    path = report.write(results, args.out)
    print(f"report: {path}", flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
