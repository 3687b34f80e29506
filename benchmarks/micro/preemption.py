"""What a CPU thief costs the engine's decode steps: the router and the load client beside the model server.

Served, the two compute threads share the machine's cores with the router's event loop, the load client
and the model server's own loop (`benchmarks.micro.serving_cpu` measures their share). When the OS
preempts one compute thread, a parallel loop that split its work in fixed halves waits at its barrier for
that thread: the stolen time is lost twice. This runs decode steps at a few batch sizes, alternating step by
step between alone and beside a thief process that spins `--busy-ms` out of every `--busy-ms + --idle-ms`
(paused between its steps with SIGSTOP, so both sides see the same contexts), and reports the medians.
A thief of 2 ms in 16 takes 1/8 of one core: losing much more than 1/16 of a two-core step means stalls.

    python -m benchmarks.micro.preemption 1 16 64
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import time

from tokenmill.engine import Engine, EngineConfig
from tokenmill.sampling_params import SamplingParams

THIEF = """
import sys, time
busy, idle = float(sys.argv[1]) / 1000, float(sys.argv[2]) / 1000
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < busy:
        pass
    time.sleep(idle)
"""


def fill(engine: Engine, batch: int, new_tokens: int) -> None:
    """`batch` streams past their prompts (one in four with 700 prompt tokens, the rest 60)."""
    rng = random.Random(0)
    for index in range(batch):
        prompt = [rng.randrange(100, 40_000) for _ in range(700 if index % 4 == 3 else 60)]
        engine.add_request(f"b{batch}-{index}", prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    while any(not state.first_output_sent for state in engine._states.values()):
        engine.step()


def alternate(engine: Engine, thief: subprocess.Popen, steps: int) -> tuple[float, float]:
    """Median step seconds alone and beside the running thief, the two taken in turn."""
    alone, beside = [], []
    for index in range(2 * steps):
        running = index % 2 == 1
        os.kill(thief.pid, signal.SIGCONT if running else signal.SIGSTOP)
        start = time.perf_counter()
        engine.step()
        (beside if running else alone).append(time.perf_counter() - start)
    os.kill(thief.pid, signal.SIGSTOP)
    return statistics.median(alone), statistics.median(beside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("batches", nargs="*", type=int, default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=20, help="steps each way per batch")
    parser.add_argument("--busy-ms", type=float, default=2.0)
    parser.add_argument("--idle-ms", type=float, default=14.0)
    args = parser.parse_args()
    engine = Engine(EngineConfig(progress=False))
    engine.warmup(progress=False)
    thief = subprocess.Popen([sys.executable, "-c", THIEF, str(args.busy_ms), str(args.idle_ms)])
    try:
        for batch in args.batches:
            fill(engine, batch, 2 * args.steps + 8)
            alone, beside = alternate(engine, thief, args.steps)
            print(f"batch {batch}: {1000 * alone:.1f} ms a step alone, {1000 * beside:.1f} beside the thief "
                  f"({beside / alone:.3f}x)", flush=True)
            while engine.has_unfinished():
                engine.step()
    finally:
        thief.kill()
        thief.wait()


if __name__ == "__main__":
    main()
