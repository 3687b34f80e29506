"""Mixture-of-experts layers on the CPU in bf16: each expert's weights packed for the AVX512-BF16 kernel
(csrc/gemm_kernels.h, as `PackedBF16Linear` packs a linear layer's), the step's (token, expert) pairs sorted
by expert once, and one packed matmul pair per expert that receives tokens.

The reference (`tokenmill.interfaces.MoEMethod`) sorts the pairs, gathers the rows and sums the weighted
outputs; `PackedBF16Experts` keeps all of that and replaces only each expert's MLP (`expert_mlp`): two
packed matmuls with the fused SiLU-and-multiply between, where the reference's `F.linear` re-lays the bf16
weight out on every call at decode sizes and runs SiLU and the product as separate ops.

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


class PackedBF16Experts(MoEMethod):
    """The CPU backend's `MoEMethod` for bf16 where the CPU has AVX512-BF16 (see the module docstring)."""

    def __init__(self) -> None:
        self.linear = PackedBF16Linear()
        self.ops = CPUFusedLayerOps()

    def prepare(self, gate_up: torch.Tensor, down: torch.Tensor) -> PackedExperts:
        return PackedExperts([self.linear.prepare(w) for w in gate_up], [self.linear.prepare(w) for w in down])

    def expert_mlp(self, rows: torch.Tensor, prepared: PackedExperts, expert: int) -> torch.Tensor:
        hidden = self.linear.matmul(rows, prepared.gate_up[expert])
        return self.linear.matmul(self.ops.silu_and_mul(hidden), prepared.down[expert])
