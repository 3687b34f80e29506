"""StarCoder2: LayerNorms with biases, biases on every attention projection (`use_bias`), a plain GELU MLP
(`c_fc`, `c_proj`) and, where the config sets one, a sliding window on every layer. Otherwise the Llama
block: fused q/k/v, RoPE, the same tensor-parallel split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.interfaces import AttentionBackend, AttentionSpec
from tokenmill.layers.mlp import MLP
from tokenmill.layers.norm import LayerNorm
from tokenmill.layers.rotary import rotary_embedding
from tokenmill.models.decoder import DecoderModel, input_norm
from tokenmill.models.llama import LlamaAttention, MakeAttention, sliding_window_of
from tokenmill.models.sharding import RankShape
from tokenmill.models.weights import CheckpointLoading
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
        hidden, residual = input_norm(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(positions, hidden, rotary, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Starcoder2ForCausalLM(DecoderModel):
    packed = {**CheckpointLoading.packed, "c_fc": ("fc1", None), "c_proj": ("fc2", None)}

    def __init__(self, config: Any, make_attention: MakeAttention, dtype: torch.dtype,
                 parallel: ParallelContext = SINGLE_RANK):
        super().__init__(config, dtype, parallel)
        shape, head_dim = self.shape, self.head_dim
        backend = make_attention(AttentionSpec(shape.num_heads, shape.num_kv_heads, head_dim, head_dim ** -0.5,
                                               dtype, sliding_window=sliding_window_of(config)))
        self.layers = nn.ModuleList(Starcoder2DecoderLayer(config, backend, dtype, shape, parallel)
                                    for _ in range(config.num_hidden_layers))
        self.norm = LayerNorm(config.hidden_size, config.norm_epsilon)
        self.rotary = rotary_embedding(config, head_dim, dtype)
        self.layer_rotary = [self.rotary] * config.num_hidden_layers
        self.build_head(dtype)
