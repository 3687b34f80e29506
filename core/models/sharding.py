"""How a Llama-family model's heads and MLP split over tensor-parallel ranks, and which rank counts work.

Query heads and the MLP's intermediate features split evenly. Key-value heads split evenly too, unless
there are fewer of them than ranks: then each is replicated on `world_size // num_kv_heads` ranks (as
vLLM does), every rank keeping the one its query heads attend with. The vocabulary never refuses a
rank count: it is padded (see `tokenmill.layers.vocab_parallel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.errors import ValidationError
from tokenmill.parallel import ParallelContext


@dataclass(frozen=True)
class RankShape:
    """One rank's share of the model's dimensions."""

    num_heads: int
    num_kv_heads: int
    kv_part: tuple[int, int]  # (index, count): this rank keeps part `index` of `count` of the k and v rows
    intermediate_size: int


def rank_shape(config: Any, parallel: ParallelContext) -> RankShape:
    """This rank's heads and intermediate size; a `ValidationError` where the model does not split."""
    heads, kv_heads, world_size = config.num_attention_heads, config.num_key_value_heads, parallel.world_size
    if not parallel.is_parallel:
        return RankShape(heads, kv_heads, (0, 1), config.intermediate_size)
    if parallel.plan is None or parallel.communicator is None:
        raise ValueError("a sharded model needs the parallel context's communicator and plan")
    problem = _sharding_problem(config, world_size)
    if problem is not None:
        counts = ", ".join(str(n) for n in working_shard_counts(config))
        raise ValidationError(f"cannot shard {problem} over {world_size} ranks; "
                              f"--num-shard values that work for this model: {counts}")
    if kv_heads >= world_size:
        kv_part, local_kv_heads = (parallel.rank, world_size), kv_heads // world_size
    else:
        # Query heads are split in order, so a rank's heads all belong to kv head rank // replicas.
        kv_part, local_kv_heads = (parallel.rank // (world_size // kv_heads), kv_heads), 1
    return RankShape(heads // world_size, local_kv_heads, kv_part, config.intermediate_size // world_size)


def _sharding_problem(config: Any, world_size: int) -> str | None:
    """The first dimension that does not split over `world_size` ranks, in words, or None."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % world_size:
        return f"{heads} attention heads"
    if kv_heads % world_size and world_size % kv_heads:
        return f"{kv_heads} key-value heads"
    if config.intermediate_size % world_size:
        return f"an intermediate size of {config.intermediate_size}"
    return None


def working_shard_counts(config: Any) -> list[int]:
    """Every rank count the model splits over (each divides the number of attention heads)."""
    return [n for n in range(1, config.num_attention_heads + 1) if _sharding_problem(config, n) is None]
