"""Gemma 2 on flattened token batches: sliding-window layers alternating with global ones, tanh soft caps
on attention scores and final logits, a GeGLU MLP, and the Gemma RMSNorm (`1 + weight`) around both the
attention and the MLP (pre and post norms). Embeddings are scaled by sqrt(hidden_size); attention by
`query_pre_attn_scalar ** -0.5`. Gemma 3's text model (gemma3.py) builds on these blocks.

Attention is Llama's (q/k/v fused, RoPE), on one backend object per distinct layer spec: the sliding
layers' and the global layers'. Tensor parallelism splits as Llama does (`tokenmill.models.llama`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.errors import ValidationError
from tokenmill.interfaces import AttentionBackend, AttentionSpec
from tokenmill.layers.mlp import GatedMLP
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import rotary_embedding
from tokenmill.layers.softcap import soft_cap
from tokenmill.models.decoder import DecoderModel, input_norm
from tokenmill.models.llama import LlamaAttention, MakeAttention
from tokenmill.models.sharding import RankShape
from tokenmill.parallel import SINGLE_RANK, ParallelContext

SLIDING = "sliding_attention"  # a `layer_types` entry; the other is "full_attention"


class GemmaDecoderLayer(nn.Module):
    """Norm, attention, norm, residual add; norm, GeGLU MLP, norm, residual add."""

    def __init__(self, config: Any, backend: AttentionBackend, dtype: torch.dtype, qk_norm: bool, shape: RankShape,
                 parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        activation = getattr(config, "hidden_activation", None) or config.hidden_act
        self.input_layernorm = RMSNorm(size, eps, offset=1.0)
        self.self_attn = LlamaAttention(config, backend, dtype, False, qk_norm, shape, parallel, qk_norm_offset=1.0)
        self.post_attention_layernorm = RMSNorm(size, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(size, eps, offset=1.0)
        self.mlp = GatedMLP(size, config.intermediate_size, activation, False, dtype, parallel)
        self.post_feedforward_layernorm = RMSNorm(size, eps, offset=1.0)

    def forward(self, positions, hidden, residual, rotary, kv_cache, metadata):
        hidden, residual = input_norm(self.input_layernorm, hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, rotary, kv_cache, metadata))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2ForCausalLM(DecoderModel):
    qk_norm = False
    attention_soft_cap = True  # Gemma 3 keeps the config field but no longer applies it

    def __init__(self, config: Any, make_attention: MakeAttention, dtype: torch.dtype,
                 parallel: ParallelContext = SINGLE_RANK):
        if getattr(config, "use_bidirectional_attention", False):
            raise ValidationError("Gemma with use_bidirectional_attention (an embedding model) is not supported; "
                                  "tokenmill serves causal language models")
        super().__init__(config, dtype, parallel)
        shape, head_dim = self.shape, self.head_dim
        # Each layer's attention (transformers fills `layer_types` in when a checkpoint's config lacks it).
        layer_types = list(config.layer_types)
        cap = config.attn_logit_softcapping if self.attention_soft_cap else None
        backends = {kind: make_attention(AttentionSpec(
            shape.num_heads, shape.num_kv_heads, head_dim, config.query_pre_attn_scalar ** -0.5, dtype,
            sliding_window=int(config.sliding_window) if kind == SLIDING else None, logit_softcap=cap))
            for kind in sorted(set(layer_types))}
        # A tensor in the model's dtype, as transformers rounds it (sqrt(3072) is 55.5 in bfloat16).
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5), persistent=False)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, backends[kind], dtype, self.qk_norm, shape, parallel)
                                    for kind in layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0)
        self.rotary = nn.ModuleDict(self.rotary_embeddings(config, sorted(set(layer_types)), dtype))
        self.layer_rotary = [self.rotary[kind] for kind in layer_types]
        self.final_logit_softcapping = config.final_logit_softcapping
        self.build_head(dtype)

    def rotary_embeddings(self, config: Any, layer_types: list[str], dtype: torch.dtype
                          ) -> dict[str, nn.Module]:
        """The RoPE of each layer type: one for all."""
        rotary = rotary_embedding(config, self.head_dim, dtype)
        return {kind: rotary for kind in layer_types}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return soft_cap(self.lm_head(hidden), self.final_logit_softcapping).float()
