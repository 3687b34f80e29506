"""Rotary position embeddings for a flat batch, with transformers' RoPE scalings.

Inverse frequencies and the attention factor (cos/sin scaling) come from transformers' own
`ROPE_INIT_FUNCTIONS`, so every scaling it knows (linear, llama3, yarn, longrope, dynamic NTK...) is
computed exactly as transformers computes it, from the same config object.

Two of them depend on the sequence's length: `dynamic` recomputes the base for the current length,
`longrope` switches from its short to its long factors past `original_max_position_embeddings`.
transformers derives that length from the forward's largest position + 1, i.e. for one sequence run
alone: its prompt length for every prompt token (the prefill is one forward), and p + 1 for the token
generated at position p (one forward per token). Keys in the cache keep the rotation they got when
computed. tokenmill gives each token that same length, `max(prompt length, position + 1)`
(`AttentionMetadata.rope_lengths`), so a sequence's output does not depend on its batch or on chunked
prefill, and equals transformers' run on that sequence alone (from a fresh model: transformers' dynamic
rotary also remembers the longest length it saw). Phi-3 (longrope) adds one rule in transformers: when
a sequence first grows past the switch, its cache is dropped and the whole sequence recomputed in one
forward with the long factors; the engine does the same (`Request.rope_prefill_length` becomes the
sequence's length then), so a sequence's cache never mixes the two factor sets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.interfaces import AttentionMetadata, LayerOps

LENGTH_DEPENDENT = ("dynamic", "longrope")


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """`rope_type`, `rope_theta` and scaling fields, from transformers 4.x or 5.x configs alike; with
    `layer_type`, that layer type's own (Gemma 3's `rope_parameters` are keyed by layer type)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None:
        params = dict(params[layer_type])
    scaling = getattr(config, "rope_scaling", None) or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def rope_depends_on_length(config: Any) -> bool:
    """Whether a token's rotation depends on its prompt's length (so its key does too)."""
    return rope_parameters(config)["rope_type"] in LENGTH_DEPENDENT


def longrope_switch_length(config: Any) -> int | None:
    """Where longrope switches from its short to its long factors, or None for other scalings."""
    params = rope_parameters(config)
    if params["rope_type"] != "longrope":
        return None
    return int(params.get("original_max_position_embeddings") or config.original_max_position_embeddings)


def context_length(config: Any) -> int:
    """The longest context the model's RoPE serves: `max_position_embeddings`, stretched by `factor` for
    the scalings that extend a context stated unscaled (linear and dynamic, and yarn as Qwen2.5 states it:
    the original length and a factor), as vLLM derives it."""
    params = rope_parameters(config)
    length = int(config.max_position_embeddings)
    if params["rope_type"] in ("linear", "dynamic"):
        return int(length * float(params["factor"]))
    if params["rope_type"] == "yarn":
        original = int(params.get("original_max_position_embeddings") or length)
        return max(length, int(original * float(params["factor"])))
    return length


def _init_function(rope_type: str):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, "
                         f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
    return ROPE_INIT_FUNCTIONS[rope_type]


def default_frequencies(head_dim: int, rope_theta: float) -> torch.Tensor:
    """Unscaled RoPE: transformers' models compute this themselves (it is not in ROPE_INIT_FUNCTIONS)."""
    return 1.0 / (float(rope_theta) ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos/sin: angles in float32, scaled after cos and sin."""
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


class RotaryEmbedding(nn.Module):
    """RoPE (the rotate-half convention of transformers' Llama) from one cos/sin table indexed by position:
    every scaling that does not depend on the sequence's length."""

    ops = LayerOps()  # the backend's, set by the engine

    def __init__(self, head_dim: int, max_positions: int, inv_freq: torch.Tensor, scaling: float,
                 dtype: torch.dtype):
        super().__init__()
        cos, sin = _cos_sin(torch.arange(max_positions), inv_freq, scaling)
        self.register_buffer("cos", cos.to(dtype), persistent=False)  # (max_positions, head_dim)
        self.register_buffer("sin", sin.to(dtype), persistent=False)

    def for_step(self, positions: torch.Tensor, metadata: AttentionMetadata) -> RotaryEmbedding:
        """The rotation this step's layers apply: the table serves every step."""
        return self

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        # query: (tokens, heads, head_dim), key: (tokens, kv_heads, head_dim)
        return self.ops.rotary(positions, query, key, self.cos, self.sin)


class LengthScaledRotaryEmbedding(nn.Module):
    """RoPE whose frequencies depend on each token's rope length (dynamic NTK, longrope; see the module's
    docstring): cos/sin are computed per step, per token."""

    ops = LayerOps()  # the backend's, set by the engine

    def __init__(self, config: Any, params: dict[str, Any], dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.rope_type = params["rope_type"]
        self.dtype = dtype
        self.init_function = _init_function(self.rope_type)
        # Plain float32 tensors, not buffers: the model's `.to(dtype)` must not round the frequencies.
        self.short_inv_freq, self.scaling = self.init_function(config, None)
        if self.rope_type == "longrope":
            # transformers' threshold and long set (computed for the first length past the threshold).
            self.threshold = longrope_switch_length(config)
            self.long_inv_freq = self.init_function(config, None, seq_len=self.threshold + 1)[0]
        else:  # dynamic: the base is rescaled only past max_position_embeddings
            self.threshold = int(config.max_position_embeddings)
        self._dynamic: dict[int, torch.Tensor] = {}

    def _dynamic_frequencies(self, length: int) -> torch.Tensor:
        if length not in self._dynamic:
            # A 0-dim int64 length, as transformers passes it: its arithmetic (float32) gives the same bits.
            inv_freq, _ = self.init_function(self.config, None, seq_len=torch.tensor(length))
            self._dynamic[length] = inv_freq.to(self.short_inv_freq.device)
        return self._dynamic[length]

    def _to_device(self, device: torch.device) -> None:
        if self.short_inv_freq.device != device:
            self.short_inv_freq = self.short_inv_freq.to(device)
            if self.rope_type == "longrope":
                self.long_inv_freq = self.long_inv_freq.to(device)
            self._dynamic.clear()

    def for_step(self, positions: torch.Tensor, metadata: AttentionMetadata) -> _StepRotary:
        lengths = metadata.rope_lengths
        if lengths is None:
            raise ValueError(f"RoPE scaling {self.rope_type!r} needs the step's rope_lengths")
        self._to_device(positions.device)
        if self.rope_type == "longrope":
            inv_freq = torch.where((lengths > self.threshold)[:, None], self.long_inv_freq, self.short_inv_freq)
        else:
            # One frequency set per distinct length past the threshold (a host read: the lengths pick them).
            distinct = sorted({n for n in lengths.tolist() if n > self.threshold})
            inv_freq = self.short_inv_freq.expand(len(lengths), -1)
            if distinct:
                table = torch.stack([self.short_inv_freq] + [self._dynamic_frequencies(n) for n in distinct])
                bounds = torch.tensor(distinct, device=lengths.device, dtype=lengths.dtype)
                inv_freq = table[torch.searchsorted(bounds, lengths, right=True)]
        cos, sin = _cos_sin(positions, inv_freq, self.scaling)
        return _StepRotary(self.ops, cos.to(self.dtype), sin.to(self.dtype))


class _StepRotary:
    """One step's per-token cos/sin rows, applied as a table indexed by the token's row."""

    def __init__(self, ops: LayerOps, cos: torch.Tensor, sin: torch.Tensor):
        self.ops, self.cos, self.sin = ops, cos, sin
        self.rows = torch.arange(cos.shape[0], device=cos.device)

    def __call__(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        return self.ops.rotary(self.rows, query, key, self.cos, self.sin)


def rotary_embedding(config: Any, head_dim: int, dtype: torch.dtype, layer_type: str | None = None) -> nn.Module:
    """The rotary embedding `config` asks for (for `layer_type`'s layers where RoPE differs by layer type)."""
    params = rope_parameters(config, layer_type)
    rope_type = params["rope_type"]
    if rope_type in LENGTH_DEPENDENT:
        if layer_type is not None:
            raise ValueError(f"RoPE scaling {rope_type!r} per layer type is not supported")
        return LengthScaledRotaryEmbedding(config, params, dtype)
    if rope_type == "default":
        inv_freq, scaling = default_frequencies(head_dim, params["rope_theta"]), 1.0
        factors = getattr(config, "rope_freq_factors", None)
        if factors is not None:  # a GGUF's rope_freqs (Llama 3.1): llama.cpp divides each frequency by its factor
            inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
    else:
        inv_freq, scaling = _init_function(rope_type)(config, None, layer_type=layer_type)
    return RotaryEmbedding(head_dim, context_length(config), inv_freq, scaling, dtype)
