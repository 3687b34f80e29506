"""Weight-only int8 on the CPU through PyTorch's own kernel (`aten._weight_int8pack_mm`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.interfaces import QuantMethod


@dataclass(frozen=True)
class Int8Weight:
    weight: torch.Tensor  # (out_features, in_features) int8
    scales: torch.Tensor  # (out_features,) per-channel, in the activation dtype


class Int8WeightOnly(QuantMethod):
    """Symmetric per-output-channel int8 weights; activations stay in their float dtype.

    Halves the bytes a bf16 decode step reads, which is what bounds batch-1 decoding on a CPU.
    """

    name = "int8"

    def prepare(self, weight: torch.Tensor) -> Int8Weight:
        w = weight.float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
        return Int8Weight(q.contiguous(), scales.to(weight.dtype))

    def matmul(self, x: torch.Tensor, prepared: Int8Weight) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, prepared.weight, prepared.scales.to(x.dtype))
