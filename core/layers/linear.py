"""Linear layers whose weights may be fused from several checkpoint tensors, or quantized."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.interfaces import GGMLWeight, QuantMethod


class Linear(nn.Module):
    """`y = x @ W.T (+ b)`; the output rows may be fused from several checkpoint tensors.

    `shard_sizes` names the row blocks of a fused weight (e.g. q, k, v) so `load_shard` can put each
    checkpoint tensor where it belongs.
    """

    def __init__(self, in_features: int, shard_sizes: Sequence[int], bias: bool, dtype: torch.dtype):
        super().__init__()
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes) + 1)]
        out_features = self.shard_offsets[-1]
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.quant_method: QuantMethod | None = None
        self.quantized: Any = None
        self._ggml_shards: dict[int | None, GGMLWeight] = {}  # shard (None: the whole weight) -> blocks

    def load_shard(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        target = self.weight if name == "weight" else self.bias
        start, end = self.shard_offsets[shard], self.shard_offsets[shard + 1]
        if tensor.shape[0] != end - start or tensor.shape[1:] != target.shape[1:]:
            raise ValueError(f"{name} shard {shard}: expected {(end - start, *target.shape[1:])}, got {tuple(tensor.shape)}")
        target.data[start:end].copy_(tensor)

    def load_ggml_shard(self, weight: GGMLWeight, shard: int | None = None) -> None:
        """Keep the GGUF blocks of one shard (None: the whole weight) for `quantize`; the dense values
        must be loaded too, through `load_shard`."""
        self._ggml_shards[shard] = weight

    def ggml_weight(self) -> GGMLWeight | None:
        """The whole weight's ggml blocks, if every shard came with blocks of one type."""
        shards = self._ggml_shards
        if None in shards:
            return shards[None]
        count = len(self.shard_offsets) - 1
        if set(shards) != set(range(count)) or len({weight.ggml_type for weight in shards.values()}) != 1:
            return None
        first = shards[0]
        return GGMLWeight(first.ggml_type, torch.cat([shards[i].blocks for i in range(count)]), first.in_features)

    def quantize(self, method: QuantMethod) -> None:
        """Prepare the weight for `method` once, from its ggml blocks where the method takes them; the
        dense weight and the blocks are dropped."""
        self.quant_method = method
        ggml = self.ggml_weight()
        prepared = method.prepare_ggml(self.weight.data, ggml) if ggml is not None else None
        self.quantized = method.prepare(self.weight.data) if prepared is None else prepared
        self.weight = None
        self._ggml_shards = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            y = self.quant_method.matmul(x, self.quantized)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)
