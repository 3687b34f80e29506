"""The paged KV cache's layout and size: the backend's layout for the model, and how many blocks fit.

The layout is chosen before the model is built (its attention layers are made for it); the number of
blocks once the weights are loaded, from the memory the backend says is left after one forward of the
largest step the scheduler can build.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from tokenmill.backend import Backend
from tokenmill.errors import ValidationError
from tokenmill.interfaces import AttentionBackend, KVCacheLayout, MemoryRequest
from tokenmill.kv_cache_dtype import parse_kv_cache_dtype, resolve_kv_cache_dtype
from tokenmill.model_runner import ModelRunner, SequenceStep
from tokenmill.models import kv_cache_shape
from tokenmill.parallel import ParallelContext

if TYPE_CHECKING:
    from tokenmill.config import EngineConfig


def kv_cache_layout(config: EngineConfig, backend: Backend, model_config: Any, dtype: torch.dtype,
                    parallel: ParallelContext, device: torch.device) -> KVCacheLayout:
    """The backend's layout for the model's cache in `--kv-cache-dtype`; refused if it cannot store that."""
    cache_dtype = resolve_kv_cache_dtype(parse_kv_cache_dtype(config.kv_cache_dtype), dtype)
    shape = dataclasses.replace(kv_cache_shape(model_config, dtype, parallel), cache_dtype=cache_dtype)
    layout = backend.kv_cache_layout(shape, device)
    if cache_dtype not in layout.cache_dtypes:
        stored = ", ".join(name if name != "auto" else f"auto ({str(dtype).removeprefix('torch.')})"
                           for name in layout.cache_dtypes)
        raise ValidationError(f"backend {backend.name!r} cannot store the KV cache as {config.kv_cache_dtype} "
                              f"with a {str(dtype).removeprefix('torch.')} model; its KV cache dtypes: {stored}")
    return layout


def count_kv_blocks(config: EngineConfig, backend: Backend, layout: KVCacheLayout, model: nn.Module,
                    parallel: ParallelContext, device: torch.device, profile: Callable[[], None]) -> int:
    """How many blocks the KV cache gets: the backend's memory budget for it (measured with `profile`),
    capped by `--max-batch-total-tokens`, the same on every rank; refused if not even one fits."""
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = backend.memory_budget(device, MemoryRequest(
        weights_bytes, config.kv_cache_bytes, config.memory_fraction, profile=profile))
    num_blocks = budget // layout.bytes_per_block()
    if config.max_batch_total_tokens:
        num_blocks = min(num_blocks, -(-config.max_batch_total_tokens // layout.block_size))
    if parallel.is_parallel:  # rank 0 hands out the block ids: every rank's cache must hold them all
        num_blocks = int(parallel.communicator.all_gather(torch.tensor([num_blocks], device=device), dim=0).min())
    if num_blocks < 1:
        raise ValidationError(f"the KV-cache budget ({budget} bytes) holds no block of "
                              f"{layout.bytes_per_block()} bytes; give more memory")
    return num_blocks


def profile_largest_step(model: nn.Module, attention: list[AttentionBackend], layout: KVCacheLayout,
                         device: torch.device, inference_mode: bool, num_tokens: int, num_seqs: int) -> None:
    """`MemoryRequest.profile`: one eager forward of the largest step, on a scratch cache freed on return.

    One sequence of `num_tokens` tokens (the step budget, capped at what the model's positions and context
    hold) asking for as many logit rows as a full batch of `num_seqs` sequences would, so the peak the
    backend measures covers the largest activations and logits a real step makes. The compiled forward
    does not exist yet: graphs are captured later, over the real cache.
    """
    num_blocks = -(-num_tokens // layout.block_size)
    scratch = layout.allocate(num_blocks)
    runner = ModelRunner(model, model, scratch, attention, layout.block_size, device, inference_mode=inference_mode)
    runner.execute([SequenceStep([0] * num_tokens, 0, list(range(num_blocks)), min(num_tokens, num_seqs))])
    del runner, scratch  # the backend reads its counters once this returns: nothing of the step stays alive
