"""IBM Granite (3.x): the Llama block with four scalars. Embeddings are multiplied by
`embedding_multiplier`, attention scores scaled by `attention_multiplier` (instead of 1/sqrt(head_dim)),
each block's output by `residual_multiplier` before it joins the residual stream, and logits divided by
`logits_scaling`. The MLP may carry biases (`mlp_bias`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.interfaces import AttentionBackend, AttentionSpec
from tokenmill.layers.mlp import GatedMLP
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import rotary_embedding
from tokenmill.models.decoder import DecoderModel, input_norm
from tokenmill.models.llama import LlamaAttention, MakeAttention
from tokenmill.models.sharding import RankShape
from tokenmill.parallel import SINGLE_RANK, ParallelContext


class GraniteDecoderLayer(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, dtype: torch.dtype, shape: RankShape,
                 parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.residual_multiplier = float(config.residual_multiplier)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, backend, dtype, False, False, shape, parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            bool(getattr(config, "mlp_bias", False)), dtype, parallel)

    def forward(self, positions, hidden, residual, rotary, kv_cache, metadata):
        hidden, residual = input_norm(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(positions, hidden, rotary, kv_cache, metadata) * self.residual_multiplier
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden) * self.residual_multiplier, residual


class GraniteForCausalLM(DecoderModel):
    def __init__(self, config: Any, make_attention: MakeAttention, dtype: torch.dtype,
                 parallel: ParallelContext = SINGLE_RANK):
        super().__init__(config, dtype, parallel)
        shape, head_dim = self.shape, self.head_dim
        backend = make_attention(AttentionSpec(shape.num_heads, shape.num_kv_heads, head_dim,
                                               float(config.attention_multiplier), dtype))
        self.embedding_multiplier = float(config.embedding_multiplier)
        self.logits_scaling = float(config.logits_scaling)
        self.layers = nn.ModuleList(GraniteDecoderLayer(config, backend, dtype, shape, parallel)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = rotary_embedding(config, head_dim, dtype)
        self.layer_rotary = [self.rotary] * config.num_hidden_layers
        self.build_head(dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embedding_multiplier

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.lm_head(hidden) / self.logits_scaling).float()
