"""Gemma 3's text model (Gemma3ForCausalLM, a Gemma3TextConfig): Gemma 2's blocks with a per-head RMSNorm
(`1 + weight`) on queries and keys before RoPE, one global layer every `sliding_window_pattern` layers,
and two RoPEs: the sliding layers' local one (`rope_local_base_freq`, unscaled) and the global layers'
(`rope_theta` with the checkpoint's scaling). Attention scores are not soft-capped (transformers ignores
`attn_logit_softcapping` here); final logits are when the config says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.layers.rotary import rotary_embedding
from tokenmill.models.gemma2 import Gemma2ForCausalLM


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
    attention_soft_cap = False

    def rotary_embeddings(self, config: Any, layer_types: list[str], dtype: torch.dtype
                          ) -> dict[str, nn.Module]:
        """One RoPE per layer type, from transformers 5's `rope_parameters` keyed by layer type."""
        return {kind: rotary_embedding(config, self.head_dim, dtype, layer_type=kind) for kind in layer_types}
