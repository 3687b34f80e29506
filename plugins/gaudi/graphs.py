"""The compiled step on Gaudi: one HPU graph per padded shape, replayed, with a mark_step per step.

``wrap_in_hpu_graph`` keys its graphs on the forward's arguments: a tensor by its shape, anything else
by its hash. `AttentionMetadata` is neither (a mutable dataclass), so `GraphStep` takes the metadata
apart into its tensors and host ints and builds it again inside the graph: one graph per (tokens,
sequences, block-table width, max_query_len), which is the core's padded step shape less the logit
rows (computed after the forward). With ``disable_tensor_cache=True`` a replay binds the call's own
tensors, the KV caches included, instead of copying them into the captured ones.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from tokenmill.interfaces import AttentionMetadata
from tokenmill.plugins.gaudi import vendor


class GraphStep(nn.Module):
    """The model's forward with the attention metadata passed as tensors and ints, as a graph keys it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                slot_mapping: torch.Tensor, max_query_len: int, max_seq_len: int) -> torch.Tensor:
        metadata = AttentionMetadata(query_start_loc, seq_lens, block_tables, slot_mapping, max_query_len, max_seq_len)
        return self.model(input_ids, positions, kv_caches, metadata)


def step_arguments(input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                   metadata: AttentionMetadata) -> tuple:
    """`GraphStep.forward`'s arguments for one step of the model's own signature."""
    return (input_ids, positions, kv_caches, metadata.query_start_loc, metadata.seq_lens, metadata.block_tables,
            metadata.slot_mapping, metadata.max_query_len, metadata.max_seq_len)


class HpuGraphRunner:
    """What `tokenmill_compile_model` returns on Gaudi: the model's step, replayed from HPU graphs.

    `capture_sizes` (``--cuda-graphs``): None captures every padded shape; ``()`` captures none (every
    step runs lazily, still one compiled recipe per shape); sizes capture only decode steps whose
    sequence bucket is listed. Every step ends with ``mark_step``, which sends lazy mode's queued ops
    to the device.
    """

    def __init__(self, model: nn.Module, wrap_in_hpu_graph: Callable[..., nn.Module], mark_step: Callable[[], None],
                 capture_sizes: tuple[int, ...] | None):
        self.step = GraphStep(model)
        self.eager = self.step.forward  # kept before wrapping: wrap_in_hpu_graph replaces `forward`
        self.capture_sizes = capture_sizes
        self.graphed = None if capture_sizes == () else wrap_in_hpu_graph(self.step, disable_tensor_cache=True)
        self.mark_step = mark_step

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 metadata: AttentionMetadata) -> torch.Tensor:
        run = self.graphed if self._captures(metadata) else self.eager
        hidden = run(*step_arguments(input_ids, positions, kv_caches, metadata))
        self.mark_step()
        return hidden

    def _captures(self, metadata: AttentionMetadata) -> bool:
        if self.graphed is None:
            return False
        if self.capture_sizes is None:
            return True
        return metadata.max_query_len == 1 and metadata.num_seqs in self.capture_sizes


def compile_model(model: nn.Module, capture_sizes: tuple[int, ...] | None) -> Any:
    htcore = vendor.module("habana_frameworks.torch.core")
    hpu = vendor.module("habana_frameworks.torch.hpu")
    return HpuGraphRunner(model, hpu.wrap_in_hpu_graph, htcore.mark_step, capture_sizes)
