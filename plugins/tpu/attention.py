"""The tpu backend's paged KV cache and attention, in torch-xla's ragged-paged-attention layout.

A layer's cache is ``[pages, page_size, 2 * kv_heads, head_dim]`` with keys and values interleaved
(key head h at 2h, value head h at 2h + 1): the layout `ragged_paged_attention` (the Pallas kernel for
TPU v4 and newer) reads. On a TPU of that generation attention runs through that kernel; everywhere
else (older TPUs, XLA's CPU device) through `_static_attention`, plain torch with no data-dependent
shape, so each padded step shape stays one XLA graph. (torch-xla's own fallback,
``use_kernel=False``, loops over sequences in Python: one compile per sequence length.)
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from tokenmill.interfaces import AttentionBackend, AttentionMetadata, AttentionSpec, KVCacheLayout, KVCacheShape

BLOCK_SIZE = 16
_NEG = -1e30  # masked scores: finite, so a row that may see nothing (padding) stays NaN-free


class XLAKVCacheLayout(KVCacheLayout):
    cache_dtypes = ("auto",)  # ragged_paged_attention is given pages in the model's dtype only

    def __init__(self, shape: KVCacheShape, device: torch.device, block_size: int = BLOCK_SIZE):
        self.shape, self.device, self.block_size = shape, device, block_size

    def page_shape(self) -> tuple[int, int, int]:
        return self.block_size, 2 * self.shape.num_kv_heads, self.shape.head_dim

    def bytes_per_block(self) -> int:
        tokens, heads, dim = self.page_shape()
        return self.shape.num_layers * tokens * heads * dim * self.shape.dtype.itemsize

    def allocate(self, num_blocks: int) -> list[torch.Tensor]:
        from tokenmill.plugins.tpu.runtime import sync

        caches = [torch.zeros((num_blocks, *self.page_shape()), dtype=self.shape.dtype, device=self.device)
                  for _ in range(self.shape.num_layers)]
        # Materialized now: a cache still pending as a lazy zeros() would make the first step of each
        # shape compile twice (once with the constant, once with device data).
        sync()
        return caches

    def copy_blocks(self, caches: Sequence[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        from tokenmill.plugins.tpu.runtime import sync

        # One block at a time, so the graph has one shape whatever the number of pairs; synced at once,
        # so the copies never join (and change) the next step's graph.
        for s, d in zip(src.cpu().tolist(), dst.cpu().tolist()):
            source, target = (torch.tensor([b], device=self.device) for b in (s, d))  # data, not constants
            for cache in caches:
                cache.index_copy_(0, target, cache.index_select(0, source))
            sync()


class XLAPagedAttention(AttentionBackend):
    def __init__(self, spec: AttentionSpec, layout: XLAKVCacheLayout, use_kernel: bool | None = None):
        self.spec, self.layout = spec, layout
        self.use_kernel = pallas_kernel_available() if use_kernel is None else use_kernel

    def prepare(self, metadata: AttentionMetadata) -> None:
        if "xla" not in metadata.backend_data:
            metadata.backend_data["xla"] = _StepIndex.of(metadata, self.layout.block_size)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        index: _StepIndex = metadata.backend_data["xla"]
        write_kv(kv_cache, key, value, index)
        if self.use_kernel:
            return _pallas_attention(query, kv_cache, metadata, index, self.spec)
        return _static_attention(query, kv_cache, metadata, index, self.spec, self.layout.block_size)


class _StepIndex:
    """Per-token indices every layer of a step reuses, all of static shape."""

    def __init__(self, seq_of_token, position, real, write_row, write_slot):
        self.seq_of_token = seq_of_token  # (T,) the sequence of each token (padding: the last sequence)
        self.position = position  # (T,) each token's position in its sequence
        self.real = real  # (T,) bool: the token belongs to a sequence
        self.write_row = write_row  # (T,) the row whose key and value go to write_slot[t]
        self.write_slot = write_slot  # (T,) cache slot of that row

    @classmethod
    def of(cls, metadata: AttentionMetadata, block_size: int) -> "_StepIndex":
        qsl, seq_lens = metadata.query_start_loc.long(), metadata.seq_lens.long()
        num_tokens = metadata.slot_mapping.shape[0]
        tokens = torch.arange(num_tokens, device=qsl.device)
        # Sequence i owns [qsl[i], qsl[i+1]): the number of ends at or before t. No searchsorted, no sync.
        seq = (tokens[:, None] >= qsl[None, 1:]).sum(1).clamp(max=seq_lens.shape[0] - 1)
        real = tokens < qsl[-1]
        position = seq_lens[seq] - (qsl[seq + 1] - tokens)
        # Slot -1 writes nothing. A static-shape scatter cannot skip rows, so each padding row rewrites the
        # last real token's key and value at that token's own slot: duplicates of one value, harmless.
        last_real = (qsl[-1] - 1).clamp(min=0)
        row = torch.where(metadata.slot_mapping >= 0, tokens, last_real)
        return cls(seq, position, real, row, metadata.slot_mapping[row])


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, index: _StepIndex) -> None:
    """This step's keys and values into the cache at their slots, interleaved per head."""
    tokens, kv_heads, dim = key.shape
    interleaved = torch.stack((key, value), dim=2).reshape(tokens, 2 * kv_heads, dim)
    kv_cache.view(-1, 2 * kv_heads, dim).index_copy_(0, index.write_slot, interleaved[index.write_row].to(kv_cache.dtype))


def _static_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                      index: _StepIndex, spec: AttentionSpec, block_size: int) -> torch.Tensor:
    """Causal attention of each token over its sequence's cached context, gathered through the block table.

    Every shape is fixed by the step's padded shape: (tokens, context = table width * block size).
    """
    tokens, heads, dim = query.shape
    kv_heads = spec.num_kv_heads
    tables = metadata.block_tables.long()[index.seq_of_token]  # (T, W)
    context = kv_cache[tables].reshape(tokens, -1, 2 * kv_heads, dim)  # (T, W * block, 2 * kv_heads, dim)
    keys, values = context[:, :, 0::2].float(), context[:, :, 1::2].float()
    q = query.float().view(tokens, kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("tkgd,tlkd->tkgl", q, keys) * spec.scale
    if spec.logit_softcap is not None:
        scores = spec.logit_softcap * torch.tanh(scores / spec.logit_softcap)
    key_pos = torch.arange(context.shape[1], device=query.device)
    visible = (key_pos[None, :] <= index.position[:, None]) & index.real[:, None]
    if spec.sliding_window is not None:
        visible &= key_pos[None, :] > index.position[:, None] - spec.sliding_window
    scores = scores.masked_fill(~visible[:, None, None, :], _NEG)
    out = torch.einsum("tkgl,tlkd->tkgd", torch.softmax(scores, dim=-1), values)
    return out.reshape(tokens, heads, dim).to(query.dtype)


def _pallas_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                      index: _StepIndex, spec: AttentionSpec) -> torch.Tensor:
    """torch-xla's ragged paged attention kernel (Pallas, TPU v4+). Never run: no TPU was at hand."""
    from torch_xla.experimental.custom_kernel import ragged_paged_attention

    num_seqs = (metadata.seq_lens > 0).sum().to(torch.int32).reshape(1)  # padded sequences have length 0
    return ragged_paged_attention(query, kv_cache, metadata.seq_lens, metadata.block_tables, metadata.query_start_loc,
                                  num_seqs, sm_scale=spec.scale, sliding_window=spec.sliding_window,
                                  soft_cap=spec.logit_softcap, use_kernel=True)


@functools.cache
def pallas_kernel_available() -> bool:
    """A TPU v4 or newer, where `ragged_paged_attention`'s Pallas kernel runs."""
    import torch_xla.runtime as xr

    if xr.device_type() != "TPU":
        return False
    try:
        from torch_xla._internal import tpu

        return tpu.version() >= 4
    except Exception:  # noqa: BLE001 - any failure to read the generation means "don't use the kernel"
        return False
