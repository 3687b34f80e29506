"""The token embedding and the output head split along the vocabulary over tensor-parallel ranks.

Each rank holds a contiguous slice of the vocabulary. The vocabulary is padded with zero rows to a
multiple of the world size (as vLLM pads it) so every slice has one size: padded ids are never looked
up, and their logits are dropped after the gather. On one rank both are the plain modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.interfaces import GGMLWeight, ShardStyle
from tokenmill.layers.linear import Linear
from tokenmill.parallel import SINGLE_RANK, ParallelContext


def padded_vocab_size(vocab_size: int, world_size: int) -> int:
    return -(-vocab_size // world_size) * world_size


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` (a weight, or a bias) padded with zero rows to `rows` rows."""
    if rows <= tensor.shape[0]:
        return tensor
    return F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, rows - tensor.shape[0]))


class Embedding(nn.Embedding):
    """The token embedding on one rank. Tied to the output head (`tie_to`), it gives its weight up once the
    head's linear method has prepared that weight in a form the method reads rows from (`QuantMethod.rows`,
    a packed bf16 head on the CPU) and looks its rows up there: the model then holds the tied weight once,
    not as the embedding's dense copy beside the head's packed one."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype):
        # `_weight`: no random init of a weight the checkpoint (or the dummy init) fills anyway.
        super().__init__(vocab_size, hidden_size, _weight=torch.empty(vocab_size, hidden_size, dtype=dtype))
        self.dtype = dtype  # of the rows it returns, with or without a weight of its own
        self.tied_head: Linear | None = None

    def tie_to(self, head: Linear) -> None:
        """Share the weight with `head` (`tie_word_embeddings`); `head.quantize` then calls `release_to_head`."""
        head.weight = self.weight
        # Plain references, not submodules: registering either would rename the head's or the embedding's
        # parameters and layers (the checkpoint names, the prepared-weights cache, LoRA targets).
        object.__setattr__(self, "tied_head", head)
        object.__setattr__(head, "tied_embedding", self)

    def release_to_head(self) -> bool:
        """Drop the dense weight where the tied head's prepared weight gives its rows; whether it did."""
        head = self.tied_head
        if head is None or head.quant_method is None or self.weight is None:
            return False
        no_ids = torch.zeros(0, dtype=torch.long, device=self.weight.device)
        if head.quant_method.rows(head.quantized, no_ids) is None:
            return False
        self.weight = None
        return True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return super().forward(input_ids)
        rows = self.tied_head.quant_method.rows(self.tied_head.quantized, input_ids.reshape(-1))
        return rows.view(*input_ids.shape, self.embedding_dim)


class VocabParallelEmbedding(nn.Module):
    """This rank's slice of the embedding: ids outside it embed to zero, and an all-reduce sums the
    ranks' rows, so every rank ends with every token's embedding."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, parallel: ParallelContext):
        super().__init__()
        self.parallel = parallel
        self.padded_vocab_size = padded_vocab_size(vocab_size, parallel.world_size)
        self.rows = self.padded_vocab_size // parallel.world_size
        self.start = parallel.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size, dtype=dtype), requires_grad=False)

    def load_shard(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        padded = _pad_rows(tensor, self.padded_vocab_size)
        local = self.parallel.plan.shard(padded, ShardStyle.COLUMN, self.parallel.rank, self.parallel.world_size)
        if local.shape != self.weight.shape:
            raise ValueError(f"embedding slice: expected {tuple(self.weight.shape)}, got {tuple(local.shape)}")
        self.weight.data.copy_(local)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.rows)
        hidden = F.embedding(torch.where(inside, local, 0), self.weight)
        hidden.masked_fill_(~inside.unsqueeze(-1), 0)
        return self.parallel.communicator.all_reduce(hidden)


class ParallelLMHead(Linear):
    """The output head, column-parallel over the padded vocabulary: each rank computes its slice of
    the logits, an all-gather puts them side by side, and the padded columns are dropped."""

    def __init__(self, hidden_size: int, vocab_size: int, dtype: torch.dtype, parallel: ParallelContext,
                 bias: bool = False):
        super().__init__(hidden_size, [padded_vocab_size(vocab_size, parallel.world_size)], bias, dtype,
                         ShardStyle.COLUMN, parallel)
        self.vocab_size = vocab_size

    def load_shard(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        super().load_shard(name, _pad_rows(tensor, self.shard_sizes[0]), shard)

    def load_ggml_shard(self, weight: GGMLWeight, shard: int | None = None) -> None:
        # Zero bytes are zero weights in every ggml type (each block's scales are zero), as the padded
        # dense rows are, so a method running the blocks computes what it would from the dense weight.
        blocks = _pad_rows(weight.blocks, self.shard_sizes[0])
        super().load_ggml_shard(GGMLWeight(weight.ggml_type, blocks, weight.in_features), shard)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.parallel.communicator.all_gather(super().forward(hidden), dim=-1)
        if logits.shape[-1] != self.vocab_size:
            logits = logits[..., :self.vocab_size].contiguous()
        return logits


def embedding(vocab_size: int, hidden_size: int, dtype: torch.dtype,
              parallel: ParallelContext = SINGLE_RANK) -> nn.Module:
    if not parallel.is_parallel:
        return Embedding(vocab_size, hidden_size, dtype)
    return VocabParallelEmbedding(vocab_size, hidden_size, dtype, parallel)


def lm_head(hidden_size: int, vocab_size: int, dtype: torch.dtype, parallel: ParallelContext = SINGLE_RANK,
            bias: bool = False) -> Linear:
    if not parallel.is_parallel:
        return Linear(hidden_size, [vocab_size], bias, dtype)
    return ParallelLMHead(hidden_size, vocab_size, dtype, parallel, bias)
