"""Pre-quantized checkpoint weights on the CPU (csrc/grouped_kernels.h) against dense bf16 and the GGUF Q4_1
kernel, at SmolLM2-135M's linear shapes and decode-to-prefill row counts: microseconds per call, the
fastest call of each form over several rounds, the forms alternating within each round (the machine is
shared: the fastest call is the one no other process interrupted).

    python -m benchmarks.micro.quantized_linears [--threads N] [--shapes 49152x576 ...] [--rounds R]
    python -m benchmarks.micro.quantized_linears --stack  # a decode step's 120 layer linears, one row
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from tokenmill.interfaces import GGMLWeight, QuantizedWeight
from benchmarks.micro.linears import LAYER_SHAPES, NUM_LAYERS
from tokenmill.plugins.cpu.quant import PackedBF16Linear

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): o_proj, gate/up, down, logits
ROWS = (1, 4, 16, 64)
ROUNDS = 5


def _integer(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Asymmetric min/max codes with fp16 scales and minimums, as GGUF's Q4_1/Q5_1 store them."""
    groups = weight.float().view(weight.shape[0], -1, group_size)
    low, high = groups.amin(-1).half().float(), groups.amax(-1)
    scales = ((high - low).clamp(min=1e-4) / ((1 << bits) - 1)).half().float()
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, (1 << bits) - 1)
    return QuantizedWeight("gptq", f"uint{bits}", codes.to(torch.uint8).view(weight.shape), scales, low, group_size)


def _symmetric(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Codes around a zero point of 2^(bits-1), every offset -z scale, as GGUF's Q4_0/Q5_0/Q6_K and
    symmetric GPTQ store them (fp16 scales)."""
    groups = weight.float().view(weight.shape[0], -1, group_size)
    zero = 1 << (bits - 1)
    scales = (groups.abs().amax(-1).clamp(min=1e-4) / zero).half().float()
    codes = (torch.round(groups / scales[..., None]) + zero).clamp(0, (1 << bits) - 1)
    return QuantizedWeight("gptq", f"uint{bits}", codes.to(torch.uint8).view(weight.shape), scales, -zero * scales,
                           group_size)


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
    """The fastest of `calls` calls."""
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        method.matmul(x, prepared)
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def _forms(method: PackedBF16Linear, weight: torch.Tensor) -> dict:
    in_features = weight.shape[1]
    return {"bf16": method.prepare(weight), "q4_1": _q4_1(method, weight),
            # 576 inputs are 4.5 groups of 128: QuantizedWeight has no partial group, so 64 there.
            "int4 g128|64": method.prepare_quantized(_integer(weight, 4, 128 if in_features % 128 == 0 else 64)),
            "int4 g32": method.prepare_quantized(_integer(weight, 4, 32)),
            "int4 g16": method.prepare_quantized(_integer(weight, 4, 16)),
            "uint5 g32": method.prepare_quantized(_integer(weight, 5, 32)),
            "uint5 g32 sym": method.prepare_quantized(_symmetric(weight, 5, 32)),
            "uint6 g16": method.prepare_quantized(_integer(weight, 6, 16)),
            "uint6 g16 sym": method.prepare_quantized(_symmetric(weight, 6, 16)),
            "int8 chan": method.prepare_quantized(_integer(weight, 8, in_features)),
            "fp8 chan": method.prepare_quantized(_fp8(weight))}


def stack(method: PackedBF16Linear, rounds: int) -> None:
    """A batch-1 decode step's layer linears (30 layers of SmolLM2-135M, 120 distinct weights: read from
    memory, not cache), each form's fastest call per linear summed."""
    shapes = LAYER_SHAPES * NUM_LAYERS
    forms = [_forms(method, torch.randn(shape, dtype=torch.bfloat16) * 0.05) for shape in shapes]
    inputs = [torch.randn(1, shape[1], dtype=torch.bfloat16) for shape in shapes]
    best = {name: [float("inf")] * len(shapes) for name in forms[0]}
    for _ in range(rounds):
        for name in best:
            for i, (prepared, x) in enumerate(zip(forms, inputs)):
                best[name][i] = min(best[name][i], _microseconds(method, prepared[name], x, 1))
    total = {name: sum(times) / 1000 for name, times in best.items()}
    print(f"120 layer linears, M=1, {torch.get_num_threads()} threads, ms (ratio to bf16): " + "  ".join(
        f"{name} {t:.2f} ({t / total['bf16']:.2f})" for name, t in total.items()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shapes", nargs="*", default=[f"{out}x{inp}" for out, inp in SHAPES])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--stack", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    method = PackedBF16Linear()
    if args.stack:
        return stack(method, args.rounds * 3)
    print(f"us per call (ratio to dense bf16), {args.threads} threads")
    for out_features, in_features in (tuple(map(int, shape.split("x"))) for shape in args.shapes):
        weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.05
        forms = _forms(method, weight)
        print(f"{out_features}x{in_features} bytes per weight: " + "  ".join(
            f"{name} {_bytes(prepared) / weight.numel():.3f}" for name, prepared in forms.items()))
        for rows in ROWS:
            x = torch.randn(rows, in_features, dtype=torch.bfloat16)
            calls = max(3, int(2e7 / (out_features * in_features * max(rows, 8))))
            best = {name: float("inf") for name in forms}
            for _ in range(args.rounds):
                for name, prepared in forms.items():
                    best[name] = min(best[name], _microseconds(method, prepared, x, calls))
            line = "  ".join(f"{name} {t:7.1f} ({t / best['bf16']:.2f})" for name, t in best.items())
            print(f"{out_features:5d}x{in_features:<4d} M={rows:2d}: {line}", flush=True)


if __name__ == "__main__":
    main()
