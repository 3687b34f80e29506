"""RoPE on the first `rotary_dim` features of each head only (Phi-2's partial_rotary_factor)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.interfaces import AttentionMetadata


def rotary_dim_of(head_dim: int, params: dict[str, Any], config: Any) -> int:
    """How many features of a head rotate: `head_dim * partial_rotary_factor`, truncated as transformers does
    (the factor is in `rope_parameters` in transformers 5 configs, on the config itself in 4.x ones)."""
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return int(head_dim * float(factor))


class PartialRotaryEmbedding(nn.Module):
    """Rotates each head's first `rotary_dim` features with `rotary` (a `rotary_dim`-wide RoPE,
    `tokenmill.layers.rotary.rotary_embedding`) and passes the rest through; used as that RoPE is."""

    def __init__(self, rotary_dim: int, rotary: nn.Module):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.rotary = rotary

    def for_step(self, positions: torch.Tensor, metadata: AttentionMetadata) -> _PartialStep:
        return _PartialStep(self.rotary_dim, self.rotary.for_step(positions, metadata))


class _PartialStep:
    def __init__(self, rotary_dim: int, rotary):
        self.rotary_dim, self.rotary = rotary_dim, rotary

    def __call__(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        d = self.rotary_dim
        # Copies: the backend's rotary may work in place and expects whole rows.
        query_rot, key_rot = self.rotary(positions, query[..., :d].contiguous(), key[..., :d].contiguous())
        return torch.cat((query_rot, query[..., d:]), dim=-1), torch.cat((key_rot, key[..., d:]), dim=-1)
