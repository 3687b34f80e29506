"""The Llama family on flattened token batches: Llama 2/3, SmolLM2, Mistral (sliding window).

Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) reuse these blocks with their flags set, in
their own files. Shapes: T tokens of all sequences concatenated, H heads, K kv heads, D head dim.

Given a `ParallelContext` of several ranks, each rank builds only its part (Megatron's split, as in
gpt-fast's tp.py): q/k/v and gate/up column-parallel, o_proj and down_proj row-parallel with an
all-reduce, embedding and head over vocabulary slices; H and K are then this rank's heads
(`tokenmill.models.sharding`). Weights are cut as they load, so `load_weights` takes the whole checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from tokenmill.interfaces import (AttentionBackend, AttentionMetadata, AttentionSpec, KVCacheShape, LayerOps,
                                  ShardStyle)
from tokenmill.layers.attention import Attention
from tokenmill.layers.linear import Linear, row_parallel_linear
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import rotary_embedding
from tokenmill.layers.vocab_parallel import embedding
from tokenmill.models.sharding import RankShape, rank_shape
from tokenmill.models.weights import CheckpointLoading, output_head
from tokenmill.parallel import SINGLE_RANK, ParallelContext

MakeAttention = Callable[[AttentionSpec], AttentionBackend]


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_cache_shape(config: Any, dtype: torch.dtype, parallel: ParallelContext = SINGLE_RANK) -> KVCacheShape:
    """What this rank caches: its own kv heads only."""
    return KVCacheShape(config.num_hidden_layers, rank_shape(config, parallel).num_kv_heads, head_dim_of(config),
                        dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, dtype: torch.dtype, qkv_bias: bool, qk_norm: bool,
                 shape: RankShape, parallel: ParallelContext = SINGLE_RANK, o_bias: bool = False,
                 qk_norm_offset: float = 0.0):
        super().__init__()
        self.num_heads = shape.num_heads
        self.num_kv_heads = shape.num_kv_heads
        self.head_dim = head_dim_of(config)
        # The checkpoint's sizes; each rank keeps its heads' rows of each (k and v: its kv head's part).
        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        parts = [(parallel.rank, parallel.world_size), shape.kv_part, shape.kv_part]
        attention_bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = Linear(config.hidden_size, [q_size, kv_size, kv_size], qkv_bias or attention_bias, dtype,
                               ShardStyle.COLUMN, parallel, parts)
        self.o_proj = row_parallel_linear(q_size, config.hidden_size, attention_bias or o_bias, dtype, parallel)
        # One norm weight of head_dim shared by every head: it applies to this rank's heads unchanged.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, qk_norm_offset) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, qk_norm_offset) if qk_norm else None
        self.attn = Attention(backend)
        local_kv_size = self.num_kv_heads * self.head_dim
        self.split = [self.num_heads * self.head_dim, local_kv_size, local_kv_size]

    def forward(self, positions, hidden, rotary, kv_cache, metadata):
        q, k, v = self.qkv_proj(hidden).split(self.split, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (T, H, D)
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # (T, K, D)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        out = self.attn(q, k, v, kv_cache, metadata)  # (T, H, D)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    ops = LayerOps()  # the backend's, set by the engine

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelContext = SINGLE_RANK,
                 intermediate_size: int | None = None):
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, [size, size], False, dtype, ShardStyle.COLUMN, parallel)
        self.down_proj = row_parallel_linear(size, config.hidden_size, False, dtype, parallel)

    def forward(self, x):
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, backend, dtype, qkv_bias: bool, qk_norm: bool, shape: RankShape,
                 parallel: ParallelContext = SINGLE_RANK, mlp: nn.Module | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, backend, dtype, qkv_bias, qk_norm, shape, parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp if mlp is not None else LlamaMLP(config, dtype, parallel)

    def forward(self, positions, hidden, residual, rotary, kv_cache, metadata):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, rotary, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(CheckpointLoading, nn.Module):
    """Decoder-only transformer over a flat batch; `forward` returns hidden states, `compute_logits` logits."""

    qkv_bias = False
    qk_norm = False

    def __init__(self, config: Any, make_attention: MakeAttention, dtype: torch.dtype,
                 parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.config = config
        self.parallel = parallel
        shape = rank_shape(config, parallel)
        head_dim = head_dim_of(config)
        window = sliding_window_of(config)
        spec = AttentionSpec(shape.num_heads, shape.num_kv_heads, head_dim, head_dim**-0.5, dtype,
                             sliding_window=window)
        backend = make_attention(spec)
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, dtype, parallel)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, backend, dtype, self.qkv_bias, self.qk_norm, shape, parallel,
                              self.make_mlp(config, index, dtype, parallel))
            for index in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = rotary_embedding(config, head_dim, dtype)
        self.lm_head, self.tie_word_embeddings = output_head(config, self.embed_tokens, dtype, parallel)
        self.to(dtype)

    def make_mlp(self, config: Any, layer_index: int, dtype: torch.dtype, parallel: ParallelContext) -> nn.Module:
        """Layer `layer_index`'s feed-forward block; mixture-of-experts families override it."""
        return LlamaMLP(config, dtype, parallel)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata,
                input_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`input_embeddings`: (token rows, embeddings) put in place of those tokens' own (an image's)."""
        hidden = self.embed_tokens(input_ids)  # (T, hidden)
        if input_embeddings is not None:
            rows, embeddings = input_embeddings
            hidden = hidden.index_copy(0, rows, embeddings.to(hidden.dtype))
        residual = None
        rotary = self.rotary.for_step(positions, metadata)  # once per step: a scaling may depend on lengths
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, rotary, kv_cache, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def sliding_window_of(config: Any) -> int | None:
    """The sliding window if the config turns it on (Mistral; Qwen2 only with use_sliding_window)."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)
