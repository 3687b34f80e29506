"""Pre-quantized checkpoint weights on the CPU (csrc/grouped_kernels.h) against dense bf16 and the GGUF Q4_1
kernel, at SmolLM2-135M's linear shapes and decode-to-prefill row counts: microseconds per call, each
method's best of several rounds, the methods alternating within each round (the machine is shared).

    python -m benchmarks.micro.quantized_linears [--threads N] [--shapes 49152x576 ...] [--rounds R]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from tokenmill.interfaces import GGMLWeight, QuantizedWeight
from tokenmill.plugins.cpu.quant import PackedBF16Linear

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): o_proj, gate/up, down, logits
ROWS = (1, 4, 16, 64)
ROUNDS = 5


def _integer(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Asymmetric min/max codes, as GPTQ without act-order or AWQ store them."""
    groups = weight.float().view(weight.shape[0], -1, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = (high - low).clamp(min=1e-8) / ((1 << bits) - 1)
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, (1 << bits) - 1)
    return QuantizedWeight("gptq", f"uint{bits}", codes.to(torch.uint8).view(weight.shape), scales, low, group_size)


def _fp8(weight: torch.Tensor) -> QuantizedWeight:
    scales = weight.float().abs().amax(1, keepdim=True) / 448
    codes = (weight.float() / scales).to(torch.float8_e4m3fn).view(torch.uint8)
    return QuantizedWeight("fp8", "fp8_e4m3", codes, scales, None, weight.shape[1])


def _q4_1(method: PackedBF16Linear, weight: torch.Tensor):
    blocks = np.ascontiguousarray(quantize(weight.float().numpy(), GGMLQuantizationType.Q4_1))
    return method.prepare_ggml(weight, GGMLWeight("Q4_1", torch.from_numpy(blocks), weight.shape[1]))


def _bytes(prepared) -> int:
    """What the prepared form keeps in memory (Q4_1: its blocks and the dense copy for many rows)."""
    dense = getattr(prepared, "dense", None)
    return prepared.packed.numel() * prepared.packed.element_size() + (_bytes(dense) if dense is not None else 0)


def _microseconds(method: PackedBF16Linear, prepared, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        method.matmul(x, prepared)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shapes", nargs="*", default=[f"{out}x{inp}" for out, inp in SHAPES])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    method = PackedBF16Linear()
    print(f"us per call (ratio to dense bf16), {args.threads} threads")
    for out_features, in_features in (tuple(map(int, shape.split("x"))) for shape in args.shapes):
        weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.05
        forms = {"bf16": method.prepare(weight), "q4_1": _q4_1(method, weight),
                 # 576 inputs are 4.5 groups of 128: QuantizedWeight has no partial group, so 64 there.
                 "int4 g128|64": method.prepare_quantized(_integer(weight, 4, 128 if in_features % 128 == 0 else 64)),
                 "int4 g16": method.prepare_quantized(_integer(weight, 4, 16)),
                 "int8 chan": method.prepare_quantized(_integer(weight, 8, in_features)),
                 "fp8 chan": method.prepare_quantized(_fp8(weight))}
        print(f"{out_features}x{in_features} bytes per weight: " + "  ".join(
            f"{name} {_bytes(prepared) / weight.numel():.3f}" for name, prepared in forms.items()))
        for rows in ROWS:
            x = torch.randn(rows, in_features, dtype=torch.bfloat16)
            calls = max(3, int(2e8 / (out_features * in_features * max(rows, 8))))
            best = {name: float("inf") for name in forms}
            for _ in range(args.rounds):
                for name, prepared in forms.items():
                    best[name] = min(best[name], _microseconds(method, prepared, x, calls))
            line = "  ".join(f"{name} {t:7.1f} ({t / best['bf16']:.2f})" for name, t in best.items())
            print(f"{out_features:5d}x{in_features:<4d} M={rows:2d}: {line}", flush=True)


if __name__ == "__main__":
    main()
