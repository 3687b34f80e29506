"""Decode steps replayed from graphs captured once per batch-size bucket (CUDA and HIP graphs).

A decode step of a small batch is a few hundred kernel launches of a few microseconds each; launched
one by one from Python the GPU idles between them. A graph records the launches once, on static input
buffers, and replays them with one call. A step is replayed when every sequence feeds one token and
the batch fits the largest bucket: its inputs are copied into the bucket's buffers, the rows past the
batch padded so they do nothing (slot -1 writes no key, sequence length 0 reads none), and the graph
replayed. Prefills and larger batches run eagerly.

The attention kernels' grids depend only on the number of sequences, never on a length read back
from the device, which is what makes a decode step capturable; `TritonPagedAttention.prepare` keeps
nothing per step, so the static metadata is all a replay needs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from tokenmill.interfaces import AttentionMetadata

logger = logging.getLogger(__name__)

# TGI's default --cuda-graphs.
DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class GraphCapture:
    """How a runtime records and replays a step: `capture(fn)` runs `fn` under capture, returns replay."""

    def capture(self, fn: Callable[[], Any]) -> Callable[[], None]:
        raise NotImplementedError


class TorchGraphCapture(GraphCapture):
    """`torch.cuda.CUDAGraph` (a HIP graph on ROCm builds), every bucket in one shared memory pool."""

    def __init__(self, runtime_module: Any):
        self.module = runtime_module
        self.pool = None

    def capture(self, fn: Callable[[], Any]) -> Callable[[], None]:
        fn()  # once outside capture: lazy initialisation and kernel compilation must not be recorded
        self.module.synchronize()
        graph = self.module.CUDAGraph()
        with self.module.graph(graph, pool=self.pool):
            fn()
        self.pool = graph.pool()
        return graph.replay


@dataclass
class _Bucket:
    """A captured batch size: its static inputs, the metadata over them, and its output buffer."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    hidden: torch.Tensor | None = None
    replay: Callable[[], None] | None = None


class DecodeGraphs:
    """The model's forward, with decode steps of up to `max(capture_sizes)` sequences replayed from graphs."""

    def __init__(self, model: nn.Module, capture: GraphCapture, capture_sizes: Sequence[int], block_size: int,
                 max_model_len: int, progress: bool = True):
        self.model = model
        self.capture_sizes = tuple(sorted(set(capture_sizes)))
        self.graphs = capture
        self.max_blocks = math.ceil(max_model_len / block_size)
        self.max_model_len = max_model_len
        self.progress = progress
        self._buckets: dict[int, _Bucket] = {}
        self._kv_caches: list[torch.Tensor] | None = None

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 metadata: AttentionMetadata) -> torch.Tensor:
        num_seqs = metadata.num_seqs
        size = next((s for s in self.capture_sizes if s >= num_seqs), None)
        if metadata.max_query_len != 1 or size is None:
            return self.model(input_ids, positions, kv_caches, metadata)
        if self._kv_caches is None:
            self._capture_all(kv_caches, input_ids.device)
        elif kv_caches[0].data_ptr() != self._kv_caches[0].data_ptr():
            raise RuntimeError("the KV cache moved after its decode graphs were captured")
        bucket = self._buckets[size]
        self._load(bucket, input_ids, positions, metadata)
        bucket.replay()
        return bucket.hidden[:num_seqs]

    def _capture_all(self, kv_caches: list[torch.Tensor], device: torch.device) -> None:
        """Capture every bucket, largest first (the smaller ones then fit in its memory pool)."""
        from tqdm import tqdm

        self._kv_caches = kv_caches
        sizes = sorted(self.capture_sizes, reverse=True)
        for size in tqdm(sizes, desc="capturing decode graphs", unit="graph", disable=not self.progress):
            bucket = self._static_bucket(size, device)
            self._buckets[size] = bucket

            def step(bucket: _Bucket = bucket) -> None:
                bucket.hidden = self.model(bucket.input_ids, bucket.positions, kv_caches, bucket.metadata)

            bucket.replay = self.graphs.capture(step)
        logger.info("captured decode graphs for batch sizes %s", ", ".join(map(str, self.capture_sizes)))

    def _static_bucket(self, size: int, device: torch.device) -> _Bucket:
        """Buffers for `size` sequences of one token each, every row padding until a step is loaded."""
        metadata = AttentionMetadata(
            query_start_loc=torch.zeros(size + 1, dtype=torch.int32, device=device),
            seq_lens=torch.zeros(size, dtype=torch.int32, device=device),
            block_tables=torch.zeros(size, self.max_blocks, dtype=torch.int32, device=device),
            slot_mapping=torch.full((size,), -1, dtype=torch.int64, device=device),
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )
        return _Bucket(torch.zeros(size, dtype=torch.int64, device=device),
                       torch.zeros(size, dtype=torch.int64, device=device), metadata)

    @staticmethod
    def _load(bucket: _Bucket, input_ids: torch.Tensor, positions: torch.Tensor,
              metadata: AttentionMetadata) -> None:
        """Copy a step of `n` sequences into the bucket; rows past `n` become padding. Device copies only."""
        n = metadata.num_seqs
        static = bucket.metadata
        bucket.input_ids[:n].copy_(input_ids)
        bucket.input_ids[n:].zero_()
        bucket.positions[:n].copy_(positions)
        bucket.positions[n:].zero_()
        static.seq_lens[:n].copy_(metadata.seq_lens)
        static.seq_lens[n:].zero_()
        static.slot_mapping[:n].copy_(metadata.slot_mapping)
        static.slot_mapping[n:].fill_(-1)
        static.query_start_loc[: n + 1].copy_(metadata.query_start_loc)
        static.query_start_loc[n + 1 :].fill_(n)  # padded sequences have no query token
        width = metadata.block_tables.shape[1]
        static.block_tables[:n, :width].copy_(metadata.block_tables)
