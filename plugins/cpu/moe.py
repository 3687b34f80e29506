"""Mixture-of-experts layers on the CPU in bf16: each expert's weights packed for the AVX512-BF16 kernel
(csrc/gemm_kernels.h, as `PackedBF16Linear` packs a linear layer's), the step's (token, expert) pairs sorted
by expert once, and one packed matmul pair per expert that receives tokens.

The reference (`tokenmill.interfaces.MoEMethod`) runs `F.linear` per expert, which at decode sizes re-lays
the bf16 weight out on every call, and gathers, weights and scatters each expert's rows on its own.
`PackedBF16Experts` gathers every pair's input row in one call, runs the experts over contiguous slices of
it (the fused SiLU-and-multiply between), and adds the weighted rows into their tokens in one float32
`index_add_`, in the reference's order (experts ascending), so only the matmuls' rounding differs.

Measured against the reference on a Qwen3-MoE-shaped layer (`python -m benchmarks.micro.moe`): see
plugins/cpu/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.interfaces import MoEMethod
from tokenmill.plugins.cpu.layer_ops import CPUFusedLayerOps
from tokenmill.plugins.cpu.quant import PackedBF16Linear, PackedBF16Weight


@dataclass(frozen=True)
class PackedExperts:
    """One layer's experts, each weight packed on its own (per expert: gate and up fused, then down)."""

    gate_up: list[PackedBF16Weight]
    down: list[PackedBF16Weight]
    hidden_size: int


class PackedBF16Experts(MoEMethod):
    """The CPU backend's `MoEMethod` for bf16 where the CPU has AVX512-BF16 (see the module docstring)."""

    def __init__(self) -> None:
        self.linear = PackedBF16Linear()
        self.ops = CPUFusedLayerOps()

    def prepare(self, gate_up: torch.Tensor, down: torch.Tensor) -> PackedExperts:
        return PackedExperts([self.linear.prepare(w) for w in gate_up], [self.linear.prepare(w) for w in down],
                             down.shape[1])

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                prepared: PackedExperts) -> torch.Tensor:
        num_tokens, top_k = ids.shape
        flat = ids.flatten()
        order = flat.argsort(stable=True)  # (token, expert) pairs grouped by expert, tokens ascending in each
        tokens = order // top_k
        counts = torch.bincount(flat, minlength=len(prepared.gate_up)).tolist()
        rows = x.to(torch.bfloat16).index_select(0, tokens)  # every pair's input, sorted: each expert a slice
        outputs, start = [], 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            hidden = self.linear.matmul(rows[start:start + count], prepared.gate_up[expert])
            outputs.append(self.linear.matmul(self.ops.silu_and_mul(hidden), prepared.down[expert]))
            start += count
        weighted = torch.cat(outputs).float().mul_(weights.flatten().index_select(0, order)[:, None])
        out = torch.zeros(num_tokens, prepared.hidden_size, dtype=torch.float32)
        return out.index_add_(0, tokens, weighted).to(x.dtype)
