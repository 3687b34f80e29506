"""`make serve`'s start-up: seconds to the first answer and peak RSS of its process tree, per variant.

    python -m benchmarks.startup [--passes 3] [--variant NAME='SERVE FLAGS' ...] [--log]

Each variant is `tokenmill serve` with `make serve`'s defaults (only the addresses differ) plus its own
flags. Passes alternate the variants (A B, A B, ...), one server up at a time, and the figures are
medians over passes: the machine is shared and noisy. A start is timed from launch to the first
answered 1-token chat (polled every 0.1 s); its memory is the summed RSS of the router, the model
server and any other descendant, sampled every 0.1 s, the peak kept; once answered, also the tree's PSS
(shared pages counted once) and the CPU seconds each process used, which a loaded machine inflates far less
than the wall time. With `--log` every log line is printed with its offset from launch: where the seconds
go.

Default variants: `cold`, an empty `--cache-dir` each start (everything derived from the checkpoint is
built again), against `warm`, a cache dir a first start filled, as on a machine that served before.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from benchmarks.servers import PeakRssSampler, free_port

POLL_S = 0.1
TIMEOUT_S = 300.0
TARGET_S, TARGET_RSS_GIB = 3.0, 1.0  # issue #22's acceptance, for the embedded model on a warm machine


def serve_command(port: int, extra: list[str]) -> list[str]:
    tokenmill = Path(sys.executable).parent / "tokenmill"
    return [str(tokenmill), "serve", "--hostname", "127.0.0.1", "--port", str(port),
            "--grpc-port", str(free_port()), *extra]


def start_once(extra: list[str], echo: bool = False) -> dict:
    """Launch `tokenmill serve` with `extra` flags (leading `KEY=VALUE` words: its environment), wait for
    its first answer, stop it; its figures."""
    env = dict(os.environ)
    while extra and "=" in extra[0] and not extra[0].startswith("-"):
        key, _, value = extra[0].partition("=")
        env[key], extra = value, extra[1:]
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen(serve_command(port, extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True, env=env)
    sampler = PeakRssSampler(server.pid, interval_s=POLL_S)
    sampler.start()
    lines: list[tuple[float, str]] = []

    def read_log() -> None:
        for line in server.stdout:
            if line.strip() and " 503" not in line:
                lines.append((time.perf_counter() - started, line.rstrip()))
                if echo:
                    print(f"{lines[-1][0]:6.2f} {line.rstrip()[:160]}", flush=True)

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    body = {"model": "tokenmill", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    try:
        elapsed = _first_answer(server, port, body, started)
        time.sleep(2 * POLL_S)  # one more sample after the answer: the peak of serving it
        rss, router_rss, pss = sampler.peak_bytes, sampler.root_peak_bytes, _tree_pss_bytes(server.pid)
        router_cpu, model_server_cpu = _cpu_seconds(server.pid)
    finally:
        sampler.stop()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        reader.join(5)
    return {"first_answer_s": elapsed, "peak_rss_gib": rss / 2**30, "router_rss_gib": router_rss / 2**30,
            "pss_gib": pss / 2**30,
            "router_cpu_s": router_cpu, "model_server_cpu_s": model_server_cpu, "log": lines}


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) the router and its children (the model server) have used so far: what
    the start costs, nearly independent of how loaded the shared machine is, unlike its wall time."""
    root = psutil.Process(pid)
    children = 0.0
    for child in root.children(recursive=True):
        try:
            times = child.cpu_times()
            children += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    times = root.cpu_times()
    return times.user + times.system, children


def _tree_pss_bytes(pid: int) -> int:
    """The tree's proportional set size once, after the first answer: pages the router and the model server
    share (torch's libraries, the page cache of mapped files) counted once, where RSS counts them in each."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def _first_answer(server: subprocess.Popen, port: int, body: dict, started: float) -> float:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    while time.perf_counter() - started < TIMEOUT_S:
        if server.poll() is not None:
            raise RuntimeError(f"tokenmill serve exited with code {server.returncode}")
        try:
            if httpx.post(url, json=body, timeout=30).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(POLL_S)
    raise RuntimeError(f"tokenmill serve gave no answer within {TIMEOUT_S} s")


def default_variants(cache_root: Path) -> dict[str, list[str]]:
    """`cold` rebuilds every derived file (a fresh cache dir per start); `warm` reuses one filled cache."""
    return {"cold": ["--cache-dir", "{fresh}"], "warm": ["--cache-dir", str(cache_root / "warm")]}


def run(passes: int = 3, variants: dict[str, list[str]] | None = None, echo: bool = False) -> dict:
    """Alternating passes over `variants` (default: cold against warm cache); medians and every pass.

    One uncounted start of each variant comes first: it fills a variant's cache and the OS page cache,
    so that every counted start is one on a warm machine."""
    with tempfile.TemporaryDirectory(prefix="tokenmill-startup-") as tmp:
        root = Path(tmp)
        variants = variants or default_variants(root)
        raw: dict[str, list[dict]] = {name: [] for name in variants}
        for name, flags in variants.items():
            start_once([flag.replace("{fresh}", str(root / f"fresh-{name}-warm-up")) for flag in flags])
        for index in range(passes):
            for name, flags in variants.items():
                fresh = root / f"fresh-{name}-{index}"
                start = start_once([flag.replace("{fresh}", str(fresh)) for flag in flags], echo)
                print(f"  pass {index + 1}/{passes} {name:>8}: first answer {start['first_answer_s']:5.2f} s, "
                      f"peak RSS {start['peak_rss_gib']:.2f} GiB (router {start['router_rss_gib']:.2f}), PSS after "
                      f"{start['pss_gib']:.2f} GiB, CPU s router "
                      f"{start['router_cpu_s']:.1f} model server {start['model_server_cpu_s']:.1f}", flush=True)
                raw[name].append({k: v for k, v in start.items() if k != "log"})
    return {"passes": passes, "flags": {name: " ".join(flags) for name, flags in variants.items()},
            "variants": {name: {"first_answer_s": statistics.median(p["first_answer_s"] for p in runs),
                                "peak_rss_gib": max(p["peak_rss_gib"] for p in runs),
                                "router_rss_gib": max(p["router_rss_gib"] for p in runs),
                                "pss_gib": max(p["pss_gib"] for p in runs),
                                **{key: statistics.median(p[key] for p in runs)
                                   for key in ("router_cpu_s", "model_server_cpu_s")}, "raw": runs}
                         for name, runs in raw.items()}}


def report_lines(results: dict) -> list[str]:
    lines = ["## Start-up (`benchmarks/startup.py`)", "",
             f"`tokenmill serve` with `make serve`'s defaults to its first answered chat; medians of "
             f"{results['passes']} alternating pass(es); peak RSS of the whole process tree (router + model "
             f"server), the highest pass. Target: ≤ {TARGET_S:g} s and ≤ {TARGET_RSS_GIB:g} GiB warm.", "",
             "| variant | flags | first answer | each pass | peak RSS (router's own) | PSS after the answer | "
             "CPU s: router, model server |", "|---|---|---|---|---|---|---|"]
    for name, figures in results["variants"].items():
        each = ", ".join(f"{p['first_answer_s']:.2f}" for p in figures["raw"])
        lines.append(f"| {name} | `{results['flags'][name]}` | {figures['first_answer_s']:.2f} s | {each} | "
                     f"{figures['peak_rss_gib']:.2f} GiB ({figures['router_rss_gib']:.2f}) | "
                     f"{figures['pss_gib']:.2f} GiB | "
                     f"{figures['router_cpu_s']:.1f}, {figures['model_server_cpu_s']:.1f} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="a variant: its name and extra serve flags, after any KEY=VALUE environment words "
                             "({fresh}: an empty folder per start); repeat to compare. Default: cold against warm "
                             "cache")
    parser.add_argument("--log", action="store_true", help="print the servers' log lines, timed from launch")
    args = parser.parse_args(argv)
    variants = {name: shlex.split(flags) for name, _, flags in (v.partition("=") for v in args.variant)} or None
    results = run(args.passes, variants, args.log)
    print("\n".join(report_lines(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
