"""The attention layer: the backend's kernel over the paged cache; no attention math of its own."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.interfaces import AttentionBackend, AttentionMetadata


class Attention(nn.Module):
    def __init__(self, backend: AttentionBackend):
        super().__init__()
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        return self.backend.forward(q, k, v, kv_cache, metadata)
