"""RMSNorm, with the residual add fused in (one pass over the hidden states instead of two)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """`x / rms(x) * weight`, computed in float32 as the reference implementations do.

    `offset=1.0` gives Gemma's `(1 + weight)` form.
    """

    def __init__(self, size: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = (h * (self.weight.float() + self.offset)).to(dtype)
        return out if residual is None else (out, residual)
