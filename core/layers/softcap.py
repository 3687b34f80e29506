"""Logit soft-capping (Gemma 2): `cap * tanh(x / cap)` keeps logits within (-cap, cap), smoothly."""

from __future__ import annotations

import torch


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`x` squashed into (-cap, cap), as transformers computes it (divide, tanh, multiply); no cap: `x`."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap
