"""Rotary position embeddings for a flat batch: a cos/sin table indexed by each token's position."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tokenmill.interfaces import LayerOps


def rope_parameters(config: Any) -> dict[str, Any]:
    """`rope_type`, `rope_theta` and scaling fields, from transformers 4.x or 5.x configs alike."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def inverse_frequencies(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """Per-pair rotation frequencies, with the scaling schemes tokenmill supports."""
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, params)
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, linear, llama3")


def _llama3_frequencies(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_context = float(params["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE (the rotate-half convention of transformers' Llama) to queries and keys."""

    ops = LayerOps()  # the backend's, set by the engine

    def __init__(self, head_dim: int, max_positions: int, params: dict[str, Any], dtype: torch.dtype):
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, params)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)  # (max_positions, head_dim)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        # query: (tokens, heads, head_dim), key: (tokens, kv_heads, head_dim)
        return self.ops.rotary(positions, query, key, self.cos, self.sin)
