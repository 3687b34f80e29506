"""`LayerOps` through the fused Triton kernels (see `layer_ops_kernels.py`)."""

from __future__ import annotations

import torch

from tokenmill.interfaces import LayerOps
from tokenmill.plugins.triton import ops


class TritonLayerOps(LayerOps):
    """RMSNorm (+ residual), RoPE and SiLU-and-mul as one kernel each; RoPE rotates in place."""

    def rms_norm(self, x, residual, weight, eps, offset=0.0):
        if residual is None:
            return ops.rms_norm(x, weight, eps, offset)
        return ops.fused_add_rms_norm(x, residual, weight, eps, offset)

    def rotary(self, positions, query, key, cos, sin):
        if query.shape[-1] % 2 or query.stride(-1) != 1 or key.stride(-1) != 1:
            # In place needs each head's elements side by side; no model here passes anything else.
            return super().rotary(positions, query, key, cos, sin)
        ops.rotary_embedding(positions, query, key, cos, sin)
        return query, key

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(gate_up)
