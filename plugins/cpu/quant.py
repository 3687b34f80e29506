"""Linear-layer methods of the CPU backend, all on PyTorch's own CPU kernels.

- `OneDNNPackedLinear`: dense bf16 weights pre-packed once into oneDNN's blocked layout. At decode sizes
  `F.linear` re-lays the weight out on every call; the packed form reads it at memory speed (2x faster
  at one token, ~1.3x at 16 to 64), with results identical to `F.linear`.
- `Int8WeightOnly` (`--quantize int8`): per-channel int8 weights through `aten._weight_int8pack_mm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.interfaces import QuantMethod


def onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNPackedLinear(QuantMethod):
    """Unquantized bf16 weights in oneDNN's packed layout (what torch.compile's CPU backend uses too)."""

    name = "onednn-bf16"

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        # The batch-size hint only picks a blocking; measured here, the same speed at 1 to 512 rows.
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)

    def matmul(self, x: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), prepared, None, "none", [], "")


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
