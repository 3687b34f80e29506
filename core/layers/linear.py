"""Linear layers whose weights may be fused from several checkpoint tensors, quantized, sharded, or adapted
by LoRA adapters (`tokenmill.lora`)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from tokenmill.interfaces import GGMLWeight, QuantizedWeight, QuantMethod, ShardStyle
from tokenmill.loader.ggml_blocks import GGML_BLOCK_TYPES, quantized_from_ggml, stack_rows
from tokenmill.parallel import SINGLE_RANK, ParallelContext

if TYPE_CHECKING:
    from tokenmill.lora.adapters import LoRALayer

logger = logging.getLogger(__name__)


class Linear(nn.Module):
    """`y = x @ W.T (+ b)`; the output rows may be fused from several checkpoint tensors.

    `shard_sizes` names the row blocks of a fused weight (e.g. q, k, v) so `load_shard` can put each
    checkpoint tensor where it belongs. Sizes are the checkpoint's. Over tensor-parallel ranks the layer
    holds only this rank's part: COLUMN keeps part `parts[i] = (index, count)` of shard i's rows (default
    `(rank, world_size)`; k/v heads replicated over ranks name fewer parts than ranks), ROW keeps this
    rank's share of the inputs. Tensors are cut as they are loaded: each rank reads the whole
    checkpoint and keeps its part. `lora`, when LoRA adapters adapt the layer, adds their contribution
    to the output (before a row-parallel layer's all-reduce: it is a partial product like the weight's).
    """

    def __init__(self, in_features: int, shard_sizes: Sequence[int], bias: bool, dtype: torch.dtype,
                 style: ShardStyle = ShardStyle.REPLICATE, parallel: ParallelContext = SINGLE_RANK,
                 parts: Sequence[tuple[int, int]] | None = None):
        super().__init__()
        self.parallel = parallel
        self.style = style if parallel.is_parallel else ShardStyle.REPLICATE
        self.shard_sizes = list(shard_sizes)
        if self.style is ShardStyle.COLUMN:
            self.parts = list(parts or [(parallel.rank, parallel.world_size)] * len(shard_sizes))
        else:
            self.parts = [(0, 1)] * len(shard_sizes)
        if any(size % count for size, (_, count) in zip(shard_sizes, self.parts)):
            raise ValueError(f"cannot split output rows {list(shard_sizes)} into parts {self.parts}")
        local_sizes = [size // count for size, (_, count) in zip(shard_sizes, self.parts)]
        self.checkpoint_in_features = in_features
        if self.style is ShardStyle.ROW:
            if in_features % parallel.world_size:
                raise ValueError(f"cannot split {in_features} input features over {parallel.world_size} ranks")
            in_features //= parallel.world_size
        self.shard_offsets = [sum(local_sizes[:i]) for i in range(len(local_sizes) + 1)]
        out_features = self.shard_offsets[-1]
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.quant_method: QuantMethod | None = None
        self.quantized: Any = None
        self._ggml_shards: dict[int | None, GGMLWeight] = {}  # shard (None: the whole weight) -> blocks
        self._quantized_shards: dict[int, QuantizedWeight] = {}  # a pre-quantized checkpoint's, by shard
        self.prepared_from: tuple[str, str | None] | None = None  # set by `quantize`
        self.lora: LoRALayer | None = None
        self.tied_embedding: Any = None  # the input embedding sharing this weight (`vocab_parallel.Embedding`)

    def load_shard(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        target = self.weight if name == "weight" else self.bias
        if target is None:
            raise ValueError(f"{name} shard {shard}: a dense tensor for a layer whose other shards are pre-quantized")
        tensor = self._local_part(name, tensor, shard)
        start, end = self.shard_offsets[shard], self.shard_offsets[shard + 1]
        if tensor.shape[0] != end - start or tensor.shape[1:] != target.shape[1:]:
            raise ValueError(f"{name} shard {shard}: expected {(end - start, *target.shape[1:])}, got {tuple(tensor.shape)}")
        target.data[start:end].copy_(tensor)

    def load_fused(self, name: str, tensor: torch.Tensor) -> None:
        """Load a tensor the checkpoint already fused (Phi-3's qkv_proj): sharded, each of its logical
        shards is split on its own, so every rank gets its q, its k and its v."""
        if self.style is ShardStyle.REPLICATE:
            getattr(self, name).data.copy_(tensor)
            return
        for shard, part in enumerate(tensor.split(self.shard_sizes)):
            self.load_shard(name, part, shard)

    def _local_part(self, name: str, tensor: torch.Tensor, shard: int) -> torch.Tensor:
        """This rank's part of a checkpoint tensor, cut by the backend's plan (which may align or pad)."""
        if self.style is ShardStyle.COLUMN:
            index, count = self.parts[shard]
            return self.parallel.plan.shard(tensor, ShardStyle.COLUMN, index, count) if count > 1 else tensor
        if self.style is ShardStyle.ROW and name == "weight":
            return self.parallel.plan.shard(tensor, ShardStyle.ROW, self.parallel.rank, self.parallel.world_size)
        return tensor  # replicated, or a row-parallel bias: whole on every rank, added once after the reduce

    def lora_part(self, a: torch.Tensor, b: torch.Tensor, shard: int | None
                  ) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """This rank's part of a LoRA pair adapting fused part `shard` (None: the whole layer).

        `a` is (rank, in_features) and `b` (out_features of the part, rank), as the checkpoint's. A is cut
        as the weight's inputs are (row-parallel), B's rows as the weight's rows are (column-parallel),
        so the rank's partial `B (A x)` is summed or gathered like its partial `W x`. Returns A and B's
        rows per part, as (part, rows). A `ValueError` where the shapes are not this layer's.
        """
        if a.shape[1] != self.checkpoint_in_features:
            raise ValueError(f"lora_A takes {a.shape[1]} inputs, the layer {self.checkpoint_in_features}")
        indices = list(range(len(self.shard_sizes))) if shard is None else [shard]
        sizes = [self.shard_sizes[i] for i in indices]
        if b.shape[0] != sum(sizes):
            raise ValueError(f"lora_B gives {b.shape[0]} outputs, the layer {sum(sizes)}")
        if self.style is ShardStyle.ROW:
            a = self.parallel.plan.shard(a, ShardStyle.ROW, self.parallel.rank, self.parallel.world_size)
        pieces = [(i, self._local_part("weight", piece, i) if self.style is ShardStyle.COLUMN else piece)
                  for i, piece in zip(indices, b.split(sizes))]
        return a, pieces

    def load_ggml_shard(self, weight: GGMLWeight, shard: int | None = None) -> None:
        """Keep the GGUF blocks of one shard (None: the whole weight) for `quantize`; the dense values
        must be loaded too, through `load_shard`."""
        if self.style is not ShardStyle.REPLICATE:
            if shard is None and len(self.shard_sizes) > 1:  # fused in the checkpoint: split per logical shard
                for index, blocks in enumerate(weight.blocks.split(self.shard_sizes)):
                    self.load_ggml_shard(GGMLWeight(weight.ggml_type, blocks, weight.in_features), index)
                return
            weight = self._local_ggml(weight, shard or 0)
            if weight is None:
                return
        self._ggml_shards[shard] = weight

    def _local_ggml(self, weight: GGMLWeight, shard: int) -> GGMLWeight | None:
        """This rank's part of the blocks, as `_local_part` cuts the dense weight (an even split), or None
        where a row-parallel cut would fall inside a ggml block.

        The blocks are ggml's layout, not a (out, in) weight, so the plan cannot cut them: rows are
        whole output features (a column split is exact), a row's bytes are its input blocks in order.
        """
        if self.style is ShardStyle.COLUMN:
            index, count = self.parts[shard]
            rows = weight.blocks.shape[0] // count
            return GGMLWeight(weight.ggml_type, weight.blocks[index * rows:(index + 1) * rows], weight.in_features)
        rank, world_size = self.parallel.rank, self.parallel.world_size
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[weight.ggml_type]]
        local_in = weight.in_features // world_size
        if local_in % block_size:
            _log_dense_fallback(weight.ggml_type, weight.in_features, world_size, block_size)
            return None
        width = local_in // block_size * type_size
        return GGMLWeight(weight.ggml_type, weight.blocks[:, rank * width:(rank + 1) * width].contiguous(), local_in)

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

    def load_quantized_shard(self, weight: QuantizedWeight, shard: int | None = None) -> None:
        """Keep a pre-quantized checkpoint's weight of one shard (None: the whole weight) for `quantize`, in
        place of the dense weight, which is dropped unmaterialised: the layer never holds its weight in
        full precision. Cut for tensor parallelism like `load_shard`'s dense tensors."""
        if shard is None and len(self.shard_sizes) > 1:  # fused in the checkpoint: split per logical shard
            rows = torch.tensor(self.shard_sizes).cumsum(0).tolist()
            for index, (start, end) in enumerate(zip([0] + rows[:-1], rows)):
                self.load_quantized_shard(_quantized_rows(weight, start, end), index)
            return
        shard = shard or 0
        if weight.in_features != self.checkpoint_in_features or weight.out_features != self.shard_sizes[shard]:
            expected = (self.shard_sizes[shard], self.checkpoint_in_features)
            raise ValueError(f"quantized weight shard {shard}: expected {expected}, "
                             f"got {(weight.out_features, weight.in_features)}")
        if self.style is ShardStyle.COLUMN:
            index, count = self.parts[shard]
            rows = weight.out_features // count
            weight = _quantized_rows(weight, index * rows, (index + 1) * rows)
        elif self.style is ShardStyle.ROW:
            weight = _quantized_inputs(weight, self.parallel.rank, self.parallel.world_size)
        self._quantized_shards[shard] = weight
        self.weight = None

    def quantized_weight(self) -> QuantizedWeight | None:
        """The whole (local) weight as one QuantizedWeight, its shards' rows stacked; None if not pre-quantized."""
        shards = self._quantized_shards
        if not shards:
            return None
        count = len(self.shard_offsets) - 1
        if set(shards) != set(range(count)):
            raise ValueError(f"only shards {sorted(shards)} of {count} are pre-quantized")
        stacked = stack_rows([shards[i] for i in range(count)])
        if stacked is None:
            raise ValueError("the fused shards of a layer are quantized differently (fp8 beside integers, "
                             "act-orders, offsets beside a table): they cannot run as one weight")
        return stacked

    def gguf_quantized(self) -> QuantizedWeight | None:
        """The whole weight as a `QuantizedWeight` from its shards' ggml blocks, of one type or several (a
        fused q/k/v whose v a Q4_K_M file keeps in Q6_K), or None where a shard has no such form."""
        shards = self._ggml_shards
        keys = [None] if None in shards else list(range(len(self.shard_offsets) - 1))
        if any(key not in shards or shards[key].ggml_type not in GGML_BLOCK_TYPES for key in keys):
            return None
        return stack_rows([quantized_from_ggml(shards[key]) for key in keys])

    def quantize(self, method: QuantMethod) -> None:
        """Prepare the weight for `method` once: from a pre-quantized checkpoint's weight, or from its ggml
        blocks where the method takes them (its own `prepare_ggml`, else `prepare_quantized` where it runs
        "gguf" checkpoints); the dense weight and the blocks are dropped. Sharded, the method prepares this
        rank's part alone. `prepared_from` says which (the path, and the ggml types of the blocks), for the
        checks that no layer fell back to its dense copy."""
        self.quant_method = method
        self._prepare(method)
        if self.tied_embedding is not None:
            self.tied_embedding.release_to_head()

    def _prepare(self, method: QuantMethod) -> None:
        quantized = self.quantized_weight()
        if quantized is not None:
            self.quantized = method.prepare_quantized(quantized)
            self.prepared_from = ("prepare_quantized", quantized.format)
            self._quantized_shards = {}
            return
        ggml = self.ggml_weight()
        prepared = method.prepare_ggml(self.weight.data, ggml) if ggml is not None else None
        types = "+".join(sorted({weight.ggml_type for weight in self._ggml_shards.values()})) or None
        self.prepared_from = ("prepare" if prepared is None else "prepare_ggml", types)
        if prepared is None and "gguf" in method.checkpoint_formats and (quantized := self.gguf_quantized()) is not None:
            prepared = method.prepare_quantized(quantized)
            self.prepared_from = ("prepare_quantized", types)
        self.quantized = method.prepare(self.weight.data) if prepared is None else prepared
        self.weight = None
        self._ggml_shards = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            y = self.quant_method.matmul(x, self.quantized)
            y = y if self.bias is None else y + self.bias
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if self.lora is None else self.lora(y, x)


def _quantized_rows(weight: QuantizedWeight, start: int, end: int) -> QuantizedWeight:
    """Output features `start:end` of a quantized weight (the same groups, act-order and lookup)."""
    offsets = None if weight.offsets is None else weight.offsets[start:end]
    return dataclasses.replace(weight, codes=weight.codes[start:end], scales=weight.scales[start:end], offsets=offsets)


def _quantized_inputs(weight: QuantizedWeight, rank: int, world_size: int) -> QuantizedWeight:
    """Rank `rank`'s even share of the inputs, cut at group boundaries (one group per row: each rank keeps its
    scales); refused where a cut falls inside a group or the inputs are act-order permuted (a rank's inputs
    would be scattered over the groups)."""
    local = weight.in_features // world_size
    one_group = weight.scales.shape[1] == 1
    if weight.input_order is not None or (local % weight.group_size and not one_group):
        raise ValueError(f"a row-parallel split of {weight.in_features} inputs over {world_size} ranks cuts "
                         f"{weight.format} groups of {weight.group_size} inputs"
                         + (" in act-order" if weight.input_order is not None else "")
                         + ": run this checkpoint with fewer shards")
    codes = weight.codes[:, rank * local:(rank + 1) * local].contiguous()
    if one_group:
        return dataclasses.replace(weight, codes=codes, group_size=local)
    groups = local // weight.group_size
    columns = slice(rank * groups, (rank + 1) * groups)
    offsets = None if weight.offsets is None else weight.offsets[:, columns].contiguous()
    return dataclasses.replace(weight, codes=codes, scales=weight.scales[:, columns].contiguous(), offsets=offsets)


class RowParallelLinear(Linear):
    """A linear whose inputs are split over ranks (o_proj, down_proj): the ranks' partial products are
    summed by an all-reduce, and the bias, whole on every rank, is added once after it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 parallel: ParallelContext):
        super().__init__(in_features, [out_features], bias, dtype, ShardStyle.ROW, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            y = self.quant_method.matmul(x, self.quantized)
        else:
            y = F.linear(x, self.weight)
        if self.lora is not None:
            y = self.lora(y, x)
        y = self.parallel.communicator.all_reduce(y)
        return y if self.bias is None else y + self.bias


def row_parallel_linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                        parallel: ParallelContext = SINGLE_RANK) -> Linear:
    """A `RowParallelLinear` over several ranks; on one, a plain `Linear`: nothing to reduce, so the
    single-process step pays nothing for tensor parallelism."""
    if not parallel.is_parallel:
        return Linear(in_features, [out_features], bias, dtype)
    return RowParallelLinear(in_features, out_features, bias, dtype, parallel)


@functools.lru_cache(maxsize=None)
def _log_dense_fallback(ggml_type: str, in_features: int, world_size: int, block_size: int) -> None:
    # Once per weight shape rather than once per layer: every layer of a shape falls back alike.
    logger.info("%s weights of %d inputs split into %d per rank, not a whole number of %d-input ggml blocks: "
                "those row-parallel layers run their dense local weight", ggml_type, in_features,
                in_features // world_size, block_size)
