"""A decode step's linears (SmolLM2-135M shapes, 30 layers + logits): our AVX512-BF16 kernel, on dense
bf16 weights and on the GGUF's Q4_1 blocks (the logits stay dense, as the GGUF's Q8_0 head does),
against oneDNN's packed weights, alternating in one process, at several batch sizes; where the CPU has
AMX, both again on its tiles (the Q4_1 blocks from GGML_MAX_ROWS rows; without AMX, a Q4_1 weight
prepared for the tiles runs its blocks at every row count).

    python -m benchmarks.micro.linears
"""

from __future__ import annotations

import time

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from tokenmill.interfaces import GGMLWeight
from tokenmill.plugins.cpu import _bf16_gemm
from tokenmill.plugins.cpu.quant import OneDNNPackedLinear, PackedBF16Linear, bf16_gemm_available

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down: (out, in)
LOGITS_SHAPE = (49152, 576)
NUM_LAYERS = 30


def _run(method, prepared, inputs) -> float:
    start = time.perf_counter()
    for weight, x in zip(prepared, inputs):
        method.matmul(x, weight)
    return time.perf_counter() - start


def _q4_1(method: PackedBF16Linear, weight: torch.Tensor):
    blocks = quantize(weight.float().numpy(), GGMLQuantizationType.Q4_1)
    return method.prepare_ggml(weight, GGMLWeight("Q4_1", torch.from_numpy(np.ascontiguousarray(blocks)),
                                                  weight.shape[1]))


def main() -> None:
    torch.manual_seed(0)
    shapes = LAYER_SHAPES * NUM_LAYERS + [LOGITS_SHAPE]
    weights = [torch.randn(shape, dtype=torch.bfloat16) * 0.05 for shape in shapes]
    methods = {"onednn": OneDNNPackedLinear()}
    prepared = {"onednn": [methods["onednn"].prepare(w) for w in weights]}
    if bf16_gemm_available():
        methods["avx512-bf16"] = methods["avx512-q4_1"] = dense = PackedBF16Linear()
        prepared["avx512-bf16"] = [dense.prepare(w) for w in weights]
        prepared["avx512-q4_1"] = [_q4_1(dense, w) for w in weights[:-1]] + prepared["avx512-bf16"][-1:]
        if _bf16_gemm.set_amx(True):  # the same weights again, on AMX tiles (Q4_1: from GGML_MAX_ROWS rows)
            methods["amx-bf16"] = methods["amx-q4_1"] = dense
            prepared["amx-bf16"] = prepared["avx512-bf16"]
            prepared["amx-q4_1"] = prepared["avx512-q4_1"]
    for rows in (1, 4, 8, 16, 64, 512):
        inputs = [torch.randn(rows, shape[1], dtype=torch.bfloat16) for shape in shapes]
        best = {name: float("inf") for name in methods}
        for _ in range(3):  # alternate, keep each one's best
            for name, method in methods.items():
                if "amx-bf16" in methods:
                    _bf16_gemm.set_amx(name.startswith("amx"))
                best[name] = min(best[name], _run(method, prepared[name], inputs))
        flops = 2 * rows * sum(out * inp for out, inp in shapes)
        line = "  ".join(f"{name} {1000 * t:6.1f} ms ({flops / t / 1e9:4.0f} GFLOP/s)" for name, t in best.items())
        print(f"M={rows:4d}: {line}", flush=True)


if __name__ == "__main__":
    main()
