"""How to build the engine, as the CLI fills it from flags and environment variables.

Kept apart from `tokenmill.engine` and free of torch: the router process (`tokenmill serve` in front of
a model server) reads these settings too, and must not pay for the engine's imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    """How to build the engine; the CLI fills it from flags and environment variables."""

    model_id: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    dtype: str = "auto"  # auto: the backend's preferred dtype
    backend: str | None = None  # None: the best discovered backend
    kv_cache_bytes: int | None = None  # None: the backend's memory budget
    kv_cache_dtype: str = "auto"  # what the KV cache stores (tokenmill.kv_cache_dtype): auto is the model's dtype
    max_batch_total_tokens: int | None = None  # cap on tokens held in the KV cache (TGI's flag)
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    # Wall time a step beside running decodes should take: prompt chunks beside them are cut to fit
    # (`tokenmill.prefill_pacing`); None: prompts take the whole step budget.
    step_target_s: float | None = None
    max_model_len: int | None = None  # None: the model's context length
    enable_prefix_caching: bool = True
    quantize: str | None = None
    seed: int = 0
    cache_dir: Path | None = None
    progress: bool = True
    memory_fraction: float = 1.0  # of device memory for weights, activations and KV cache together (as TGI)
    graph_batch_sizes: tuple[int, ...] | None = None  # decode batch sizes to capture; (): none; None: the backend's
    load_format: str = "auto"  # "dummy": random weights of the model's shape, no weight file read
    # Tensor parallelism, one process a rank (core/shard.py): machine `node_rank` hosts ranks
    # node_rank * local_shards ... + local_shards - 1; all meet at master_addr:master_port.
    num_shard: int = 1  # the world size
    rank: int = 0  # this process's rank
    local_shards: int | None = None  # ranks on each machine; None: all of them on this one
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    rendezvous_timeout_s: float = 120.0  # every rank must have joined by then
    cpu_bind: tuple[tuple[int, ...], ...] = ()  # the cores of each local rank, in local-rank order; (): unpinned
    # LoRA adapters served next to the base model: (name requests use, PEFT folder or hub id), in slot order.
    lora_adapters: tuple[tuple[str, str], ...] = ()
    speculate: int = 0  # draft tokens per decoding sequence and step, by n-gram prompt lookup (TGI's); 0: off

    @property
    def ranks_per_node(self) -> int:
        return self.local_shards or self.num_shard

    @property
    def local_rank(self) -> int:
        """This rank's index on its machine: the device it runs on."""
        return self.rank - self.node_rank * self.ranks_per_node
