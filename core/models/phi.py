"""Phi-1/1.5/2 (PhiForCausalLM): one LayerNorm feeding attention and the MLP in parallel, whose outputs
join the residual stream together; RoPE on the first `partial_rotary_factor` of each head only; biases
on every linear layer (attention's output projection is `dense`), the output head included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.errors import ValidationError
from tokenmill.interfaces import AttentionBackend, AttentionSpec
from tokenmill.layers.mlp import MLP
from tokenmill.layers.norm import LayerNorm
from tokenmill.layers.partial_rotary import PartialRotaryEmbedding, rotary_dim_of
from tokenmill.layers.rotary import rope_parameters, rotary_embedding
from tokenmill.models.decoder import DecoderModel, input_norm
from tokenmill.models.llama import LlamaAttention, MakeAttention
from tokenmill.models.sharding import RankShape
from tokenmill.models.weights import CheckpointLoading
from tokenmill.parallel import SINGLE_RANK, ParallelContext


class PhiDecoderLayer(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, dtype: torch.dtype, shape: RankShape,
                 parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = LlamaAttention(config, backend, dtype, True, False, shape, parallel, o_bias=True)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act, True, dtype, parallel)

    def forward(self, positions, hidden, residual, rotary, kv_cache, metadata):
        hidden, residual = input_norm(self.input_layernorm, hidden, residual)
        # The next norm adds the residual last: transformers' (attention + MLP) + residual.
        return self.self_attn(positions, hidden, rotary, kv_cache, metadata) + self.mlp(hidden), residual


class PhiForCausalLM(DecoderModel):
    packed = {**CheckpointLoading.packed, "dense": ("o_proj", None)}
    final_norm = "final_layernorm"

    def __init__(self, config: Any, make_attention: MakeAttention, dtype: torch.dtype,
                 parallel: ParallelContext = SINGLE_RANK):
        if getattr(config, "qk_layernorm", False):
            raise ValidationError("Phi with qk_layernorm is not supported yet; Phi-1, Phi-1.5 and Phi-2 "
                                  "checkpoints do not use it")
        super().__init__(config, dtype, parallel)
        shape, head_dim = self.shape, self.head_dim
        backend = make_attention(AttentionSpec(shape.num_heads, shape.num_kv_heads, head_dim, head_dim ** -0.5,
                                               dtype))
        self.layers = nn.ModuleList(PhiDecoderLayer(config, backend, dtype, shape, parallel)
                                    for _ in range(config.num_hidden_layers))
        self.final_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        params = rope_parameters(config)
        rotary_dim = rotary_dim_of(head_dim, params, config)
        self.rotary = (rotary_embedding(config, head_dim, dtype) if rotary_dim == head_dim else
                       PartialRotaryEmbedding(rotary_dim, rotary_embedding(config, rotary_dim, dtype)))
        self.layer_rotary = [self.rotary] * config.num_hidden_layers
        self.build_head(dtype, bias=True)
