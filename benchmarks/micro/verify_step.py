"""Forward time of a speculative verification step against a plain decode step, on the served default.

One sequence with a 300-token context: a one-token decode step, and verification steps of 1 + k tokens
(`--speculate k`) through the backend's compiled step and through the module-by-module forward, each
timed alone, interleaved, best and median of the repeats (the machine's noise hits every variant alike).
With N tokens per forward, speculation pays where verify / decode < N.

    python -m benchmarks.micro.verify_step [repeats]
"""

from __future__ import annotations

import random
import statistics
import sys
import time

from tokenmill.engine import Engine, EngineConfig
from tokenmill.model_runner import SequenceStep

CONTEXT = 300
DRAFTS = (1, 3, 7)


def main(repeats: int) -> None:
    engine = Engine(EngineConfig(progress=False, kv_cache_bytes=64 << 20, enable_prefix_caching=False))
    runner, block_size = engine.runner, engine.layout.block_size
    rng = random.Random(0)
    prompt = [rng.randrange(100, 40_000) for _ in range(CONTEXT)]
    table = list(range(1, 2 + (CONTEXT + max(DRAFTS) + 1) // block_size))
    runner.execute([SequenceStep(prompt, 0, table, 1)])
    compiled, module = runner.forward, engine.model
    variants = {"decode": (compiled, 1)}
    for k in DRAFTS:
        variants[f"verify 1+{k}"] = (compiled, k + 1)
        variants[f"verify 1+{k}, module by module"] = (module, k + 1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (forward, fed) in variants.items():
            runner.forward = forward
            step = [SequenceStep(prompt[:fed], CONTEXT, table, fed)]
            start = time.perf_counter()
            runner.execute(step)
            times[name].append(time.perf_counter() - start)
    runner.forward = compiled
    decode = min(times["decode"])
    for name, spent in times.items():
        print(f"{name:32s} best {1000 * min(spent):6.1f} ms  median {1000 * statistics.median(spent):6.1f} ms  "
              f"best / decode {min(spent) / decode:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
