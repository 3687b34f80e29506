"""StarCoder2: LayerNorms with biases, biases on every attention projection (`use_bias`), a plain GELU MLP
(`c_fc`, `c_proj`) and, where the config sets one, a sliding window on every layer. Otherwise the Llama
block: fused q/k/v, RoPE, the same tensor-parallel split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.interfaces import AttentionBackend, AttentionMetadata, AttentionSpec
from tokenmill.layers.mlp import MLP
from tokenmill.layers.norm import LayerNorm
from tokenmill.layers.rotary import RotaryEmbedding, rope_parameters
from tokenmill.layers.vocab_parallel import embedding
from tokenmill.models.llama import LlamaAttention, MakeAttention, head_dim_of, sliding_window_of
from tokenmill.models.sharding import RankShape, rank_shape
from tokenmill.models.weights import CheckpointLoading, output_head
from tokenmill.parallel import SINGLE_RANK, ParallelContext


class Starcoder2DecoderLayer(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, dtype: torch.dtype, shape: RankShape,
                 parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        bias = bool(config.use_bias)
        self.input_layernorm = LayerNorm(config.hidden_size, config.norm_epsilon)
        self.self_attn = LlamaAttention(config, backend, dtype, bias, False, shape, parallel, o_bias=bias)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.norm_epsilon)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias, dtype, parallel)

    def forward(self, positions, hidden, residual, rotary, kv_cache, metadata):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, rotary, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Starcoder2ForCausalLM(CheckpointLoading, nn.Module):
    """StarCoder2; `forward` returns hidden states, `compute_logits` logits."""

    packed = {**CheckpointLoading.packed, "c_fc": ("fc1", None), "c_proj": ("fc2", None)}

    def __init__(self, config: Any, make_attention: MakeAttention, dtype: torch.dtype,
                 parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.config = config
        self.parallel = parallel
        shape = rank_shape(config, parallel)
        head_dim = head_dim_of(config)
        backend = make_attention(AttentionSpec(shape.num_heads, shape.num_kv_heads, head_dim, head_dim ** -0.5,
                                               dtype, sliding_window=sliding_window_of(config)))
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, dtype, parallel)
        self.layers = nn.ModuleList(Starcoder2DecoderLayer(config, backend, dtype, shape, parallel)
                                    for _ in range(config.num_hidden_layers))
        self.norm = LayerNorm(config.hidden_size, config.norm_epsilon)
        self.rotary = RotaryEmbedding(head_dim, config.max_position_embeddings, rope_parameters(config), dtype)
        self.lm_head, self.tie_word_embeddings = output_head(config, self.embed_tokens, dtype, parallel)
        self.to(dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # (T, hidden)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, self.rotary, kv_cache, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
