"""RMSNorm and LayerNorm, with the residual add fused in (RMSNorm: one pass over the hidden states instead of two)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.interfaces import LayerOps


class RMSNorm(nn.Module):
    """`x / rms(x) * weight`, computed in float32 as the reference implementations do.

    `offset=1.0` gives Gemma's `(1 + weight)` form. `ops` is the backend's (set by the engine).
    """

    ops = LayerOps()

    def __init__(self, size: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.ops.rms_norm(x, residual, self.weight, self.eps, self.offset)


class LayerNorm(nn.Module):
    """`(x - mean) / std * weight + bias` (StarCoder2, Phi-2), with `RMSNorm`'s calling convention: given a
    residual, normalises `x + residual` and returns `(normalised, x + residual)`."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        x = x + residual
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps), x
