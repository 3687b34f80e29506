"""RMSNorm, with the residual add fused in (one pass over the hidden states instead of two)."""

from __future__ import annotations

import torch
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
