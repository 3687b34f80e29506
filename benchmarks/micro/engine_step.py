"""Decode-step breakdown of the engine at a batch size, with the bench's mix of contexts.

Three sequences in four have a short prompt (60 tokens), one a long one (700): prefill them all, then
time 20 decode steps and the share of linears, decode attention and logits in each.

    python -m benchmarks.micro.engine_step 1 16 64
"""

from __future__ import annotations

import argparse
import collections
import random
import time

from tokenmill.engine import Engine, EngineConfig
from tokenmill.models import llama
from tokenmill.plugins.cpu import attention, quant
from tokenmill.sampling_params import SamplingParams

SPENT: dict[str, float] = collections.defaultdict(float)


def _time_calls(owner, name: str, label: str) -> None:
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - start

    setattr(owner, name, timed)


def measure(engine: Engine, batch: int, steps: int = 20) -> str:
    rng = random.Random(0)
    for index in range(batch):
        prompt = [rng.randrange(100, 40_000) for _ in range(700 if index % 4 == 3 else 60)]
        engine.add_request(f"b{batch}-{index}", prompt, SamplingParams(max_new_tokens=steps + 40, ignore_eos=True))
    while any(not state.first_output_sent for state in engine._states.values()):
        engine.step()
    for _ in range(5):
        engine.step()
    SPENT.clear()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step = (time.perf_counter() - start) / steps
    parts = ", ".join(f"{label} {1000 * total / steps:.1f} ms" for label, total in SPENT.items())
    while engine.has_unfinished():
        engine.step()
    return f"batch {batch}: {1000 * step:.1f} ms/step ({batch / step:.0f} tok/s); {parts}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("batches", nargs="*", type=int, default=[1, 16, 64])
    args = parser.parse_args()
    _time_calls(quant.PackedBF16Linear, "matmul", "linears (logits included)")
    _time_calls(quant.OneDNNPackedLinear, "matmul", "linears (logits included)")
    _time_calls(attention, "paged_decode_attention", "decode attention")
    _time_calls(llama.LlamaForCausalLM, "compute_logits", "logits")
    engine = Engine(EngineConfig(progress=False))
    engine.warmup(progress=False)
    for batch in args.batches:
        print(measure(engine, batch), flush=True)


if __name__ == "__main__":
    main()
