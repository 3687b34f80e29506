"""A mixture-of-experts layer's experts: the reference `MoEMethod` against the CPU backend's `PackedBF16Experts`.

The layer is Qwen3-30B-A3B's (hidden 2048, expert intermediate 768, top-8) with 64 of its 128 experts, to
keep the weights (600 MB in bf16, twice that with the packed copy) small next to the machine's memory;
routing is random, so a step of T tokens sends T * 8 rows to up to 64 experts. bfloat16 on one thread, the
two methods alternating in one process; both include the routing (softmax, top-k, renormalization).

    python -m benchmarks.micro.moe
"""

from __future__ import annotations

import statistics
import timeit

import torch

from tokenmill.interfaces import MoEMethod
from tokenmill.plugins.cpu.moe import PackedBF16Experts
from tokenmill.plugins.cpu.quant import bf16_gemm_available

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 2048, 768, 64, 8
TOKENS = (1, 4, 16, 64, 256)


def _median_ms(fn, reps: int) -> float:
    return 1000 * statistics.median(timeit.repeat(fn, number=1, repeat=reps))


def main() -> None:
    if not bf16_gemm_available():
        raise SystemExit("the CPU backend's packed bf16 kernel needs AVX512-BF16, which this CPU lacks")
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=generator) * 0.02).to(torch.bfloat16)
    down = (torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, generator=generator) * 0.02).to(torch.bfloat16)
    methods = {"reference": MoEMethod(), "CPU packed": PackedBF16Experts()}
    prepared = {label: method.prepare(gate_up, down) for label, method in methods.items()}
    print(f"bfloat16, one thread: {EXPERTS} experts {HIDDEN} -> {INTERMEDIATE} -> {HIDDEN}, top-{TOP_K}; "
          "median ms per layer call")
    print(f"  {'tokens':>6s} {'reference':>10s} {'CPU packed':>10s} {'speed-up':>8s}")
    for num_tokens in TOKENS:
        x = torch.randn(num_tokens, HIDDEN, generator=generator).to(torch.bfloat16)
        logits = torch.randn(num_tokens, EXPERTS, generator=generator).to(torch.bfloat16)
        want = methods["reference"].apply(x, logits, prepared["reference"], TOP_K, True)
        got = methods["CPU packed"].apply(x, logits, prepared["CPU packed"], TOP_K, True)
        error = (got.float() - want.float()).abs().max().item()
        reps = 5 if num_tokens > 64 else 20
        results: dict[str, list[float]] = {label: [] for label in methods}
        for _ in range(5):  # alternate, so load on the machine hits both alike
            for label, method in methods.items():
                results[label].append(_median_ms(
                    lambda m=method, p=prepared[label]: m.apply(x, logits, p, TOP_K, True), reps))
        reference, packed = (statistics.median(results[label]) for label in methods)
        print(f"  {num_tokens:6d} {reference:10.2f} {packed:10.2f} {reference / packed:7.2f}x"
              f"   (max |difference| {error:.2g})")


if __name__ == "__main__":
    main()
