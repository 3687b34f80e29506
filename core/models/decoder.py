"""What the pre-norm decoder families share (Gemma 2/3, Granite, StarCoder2, Phi-2): the embedding and
output head split over ranks, the residual stream through the blocks, the final norm.

A block takes `(hidden, residual)` and returns its output and the residual stream without that output:
the next block's input norm adds the two (`input_norm`), fused with the norm where the backend fuses it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.interfaces import AttentionMetadata
from tokenmill.layers.vocab_parallel import embedding
from tokenmill.models.llama import head_dim_of
from tokenmill.models.sharding import rank_shape
from tokenmill.models.weights import CheckpointLoading, output_head
from tokenmill.parallel import ParallelContext


def input_norm(norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None):
    """A block's normalised input and the residual stream: the previous block's output added to the
    stream, or, in the first block, the embeddings themselves."""
    if residual is None:
        return norm(hidden), hidden
    return norm(hidden, residual)


class DecoderModel(CheckpointLoading, nn.Module):
    """Embeddings, then `layers` over the residual stream, `norm`, and `lm_head`.

    A family's `__init__` calls this one's, builds `layers`, the final norm and the RoPE each layer uses
    (`layer_rotary`), then `build_head`. It may scale the embeddings (`embed`) or the logits
    (`compute_logits`). `forward` returns hidden states, `compute_logits` float logits.
    """

    final_norm = "norm"  # the final norm's name in the checkpoint (Phi-2: final_layernorm)

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelContext):
        super().__init__()
        self.config = config
        self.parallel = parallel
        self.shape = rank_shape(config, parallel)  # this rank's heads
        self.head_dim = head_dim_of(config)
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, dtype, parallel)
        self.layer_rotary: list[nn.Module] = []  # per layer; the modules themselves are registered by the family

    def build_head(self, dtype: torch.dtype, bias: bool = False) -> None:
        """The output head (the embedding, if tied); then every weight in `dtype`."""
        self.lm_head, self.tie_word_embeddings = output_head(self.config, self.embed_tokens, dtype, self.parallel,
                                                             bias)
        self.to(dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed(input_ids)  # (T, hidden)
        residual = None
        # Each RoPE once per step: a scaling may depend on the sequences' lengths (`tokenmill.layers.rotary`).
        unique = {id(r): r for r in self.layer_rotary}  # layers share RoPE modules: each is computed once
        step_rotary = {key: r.for_step(positions, metadata) for key, r in unique.items()}
        for layer, rotary, kv_cache in zip(self.layers, self.layer_rotary, kv_caches):
            hidden, residual = layer(positions, hidden, residual, step_rotary[id(rotary)], kv_cache, metadata)
        hidden, _ = getattr(self, self.final_norm)(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
