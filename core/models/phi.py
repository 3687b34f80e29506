"""Phi-1/1.5/2 (PhiForCausalLM): one LayerNorm feeding attention and the MLP in parallel, whose outputs
are added to the residual together; RoPE on the first `partial_rotary_factor` of each head only; biases
on every linear layer (attention's output projection is `dense`), the output head included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.errors import ValidationError
from tokenmill.interfaces import AttentionBackend, AttentionMetadata, AttentionSpec
from tokenmill.layers.mlp import MLP
from tokenmill.layers.norm import LayerNorm
from tokenmill.layers.partial_rotary import PartialRotaryEmbedding, rotary_dim_of
from tokenmill.layers.rotary import RotaryEmbedding, rope_parameters
from tokenmill.layers.vocab_parallel import embedding
from tokenmill.models.llama import LlamaAttention, MakeAttention, head_dim_of
from tokenmill.models.sharding import RankShape, rank_shape
from tokenmill.models.weights import CheckpointLoading, output_head
from tokenmill.parallel import SINGLE_RANK, ParallelContext


class PhiDecoderLayer(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, dtype: torch.dtype, shape: RankShape,
                 parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = LlamaAttention(config, backend, dtype, True, False, shape, parallel, o_bias=True)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act, True, dtype, parallel)

    def forward(self, positions, hidden, rotary, kv_cache, metadata):
        normed = self.input_layernorm(hidden)
        # transformers' order of the sum: (attention + MLP) + residual.
        return self.self_attn(positions, normed, rotary, kv_cache, metadata) + self.mlp(normed) + hidden


class PhiForCausalLM(CheckpointLoading, nn.Module):
    """Phi-2; `forward` returns hidden states, `compute_logits` logits (the head has a bias)."""

    packed = {**CheckpointLoading.packed, "dense": ("o_proj", None)}

    def __init__(self, config: Any, make_attention: MakeAttention, dtype: torch.dtype,
                 parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        if getattr(config, "qk_layernorm", False):
            raise ValidationError("Phi with qk_layernorm is not supported yet; Phi-1, Phi-1.5 and Phi-2 "
                                  "checkpoints do not use it")
        self.config = config
        self.parallel = parallel
        shape = rank_shape(config, parallel)
        head_dim = head_dim_of(config)
        backend = make_attention(AttentionSpec(shape.num_heads, shape.num_kv_heads, head_dim, head_dim ** -0.5,
                                               dtype))
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, dtype, parallel)
        self.layers = nn.ModuleList(PhiDecoderLayer(config, backend, dtype, shape, parallel)
                                    for _ in range(config.num_hidden_layers))
        self.final_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        params = rope_parameters(config)
        rotary_dim = rotary_dim_of(head_dim, params, config)
        self.rotary = (RotaryEmbedding(head_dim, config.max_position_embeddings, params, dtype)
                       if rotary_dim == head_dim else
                       PartialRotaryEmbedding(rotary_dim, config.max_position_embeddings, params, dtype))
        self.lm_head, self.tie_word_embeddings = output_head(config, self.embed_tokens, dtype, parallel, bias=True)
        self.to(dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # (T, hidden)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(positions, hidden, self.rotary, kv_cache, metadata)
        return self.final_layernorm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
