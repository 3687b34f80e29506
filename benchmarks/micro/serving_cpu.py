"""Where a served load's CPU goes: CPU cores by process and thread over `make bench`'s closed loop.

Starts `tokenmill serve` as the bench does, runs the fixed load at one concurrency, and reads every
thread's CPU time (psutil) before and after: the model server's compute threads against its event loop,
the router's event loop and the load client (this process). Cores = CPU seconds / wall seconds; a
thread's microseconds per streamed token = its cores / tok/s.

    python -m benchmarks.micro.serving_cpu 64
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.load import closed_loop
from benchmarks.run import requests_for
from benchmarks.servers import RunningServer
from benchmarks.specs import tokenmill_spec
from benchmarks.stats import summarise

ThreadKey = tuple[str, int]  # (process, thread id)


def _process_name(process: psutil.Process) -> str:
    command = " ".join(process.cmdline())
    if process.pid == psutil.Process().pid:
        return "load client"
    return "model server" if "model-server" in command else "router"


def thread_cpu_seconds(root_pid: int) -> dict[ThreadKey, float]:
    """User + system CPU seconds of every thread of the server's process tree and of this process."""
    root = psutil.Process(root_pid)
    seconds = {}
    for process in [root, *root.children(recursive=True), psutil.Process()]:
        try:
            name = _process_name(process)
            for thread in process.threads():
                seconds[(name, thread.id)] = thread.user_time + thread.system_time
        except psutil.NoSuchProcess:
            continue
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("concurrency", type=int, nargs="?", default=64)
    args = parser.parse_args()
    spec = tokenmill_spec()
    server = RunningServer(spec, Path(tempfile.mkdtemp()))
    try:
        asyncio.run(closed_loop(server.base_url, spec.model, 8, 8))  # warm the server's paths first
        before, start = thread_cpu_seconds(server.process.pid), time.perf_counter()
        records, duration = asyncio.run(closed_loop(server.base_url, spec.model, args.concurrency,
                                                    requests_for(args.concurrency)))
        after, wall = thread_cpu_seconds(server.process.pid), time.perf_counter() - start
    finally:
        server.stop()
    tok_s = summarise(records, duration)["output_tok_s"]
    print(f"c={args.concurrency}: {tok_s:.1f} tok/s over {wall:.1f} s")
    spent = sorted(((after[key] - before.get(key, 0.0), key) for key in after), reverse=True)
    for seconds, (process, thread_id) in spent:
        cores = seconds / wall
        if cores >= 0.005:
            print(f"  {process:12s} thread {thread_id:7d}: {cores:.3f} cores, {1e6 * cores / tok_s:6.1f} us a token")


if __name__ == "__main__":
    main()
