"""The paged-attention kernels against the float64 reference, through `TritonPagedAttention`.

Each case runs the way the engine would: a first call writes every sequence's earlier context through
the kernels (and is checked too), then the batch under test attends over it. Shapes are tiny because
the interpreter costs ~5 ms per program and key block.
"""

from __future__ import annotations

import pytest
import torch

from tokenmill.conformance.reference import build_paged_batch, reference_attention
from tokenmill.interfaces import AttentionMetadata, AttentionSpec, KVCacheShape
from tokenmill.plugins.triton import ops
from tokenmill.plugins.triton.attention import TritonKVCacheLayout, TritonPagedAttention

B = 16  # block size
NUM_BLOCKS = 24
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

# (num_cached, num_new) per sequence. Decodes sit at contexts b-1, b and b+1 after their new token.
BATCHES = {
    "prefill": [(0, 20), (0, 5), (0, 1)],
    "chunked_prefill": [(B, 9), (5, 7)],
    "decode": [(B - 2, 1), (B - 1, 1), (B, 1), (2 * B + 3, 1)],
    "mixed": [(2 * B + 1, 1), (0, B + 2), (B - 1, 1), (7, B + 9)],
}


def _spec(dtype=torch.float32, heads=(4, 2), head_dim=32, **kwargs) -> AttentionSpec:
    return AttentionSpec(heads[0], heads[1], head_dim, head_dim**-0.5, dtype, **kwargs)


def _check(spec: AttentionSpec, seqs, device, block_size: int = B) -> None:
    layout = TritonKVCacheLayout(KVCacheShape(1, spec.num_kv_heads, spec.head_dim, spec.dtype), device, block_size)
    kv_cache = layout.allocate(NUM_BLOCKS)[0]
    attention = TritonPagedAttention(spec, layout)
    batch = build_paged_batch(layout, NUM_BLOCKS, spec, seqs, torch.Generator().manual_seed(len(seqs)), device)
    checks = [(batch.step, batch.full_keys, batch.full_values, batch.query_lens)]
    if batch.fill is not None:
        cached = [c for c, _ in seqs if c]
        keys = [k[:c] for k, (c, _) in zip(batch.full_keys, seqs) if c]
        values = [v[:c] for v, (c, _) in zip(batch.full_values, seqs) if c]
        checks.insert(0, (batch.fill, keys, values, cached))
    for step, keys, values, query_lens in checks:
        attention.prepare(step.metadata)
        out = attention.forward(step.query, step.key, step.value, kv_cache, step.metadata)
        assert out.shape == step.query.shape and out.dtype == step.query.dtype
        expected = reference_attention(step.query.cpu(), keys, values, query_lens, spec)
        error = (out.double().cpu() - expected).abs().max().item()
        assert error < TOLERANCE[spec.dtype], f"max abs error {error:.2e}"
    _assert_cache_holds(kv_cache, batch, seqs, block_size)


def _assert_cache_holds(kv_cache, batch, seqs, block_size) -> None:
    """Every token's key and value sit exactly at its slot (block * block_size + offset)."""
    tables = batch.step.metadata.block_tables.cpu()
    for i, (keys, values) in enumerate(zip(batch.full_keys, batch.full_values)):
        positions = torch.arange(keys.shape[0])
        blocks = tables[i, positions // block_size].long()
        offsets = positions % block_size
        assert torch.equal(kv_cache[0][blocks, :, offsets].cpu(), keys)
        assert torch.equal(kv_cache[1][blocks, :, offsets].cpu(), values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(BATCHES))
def test_batches_match_reference(device, case, dtype) -> None:
    _check(_spec(dtype), BATCHES[case], device)


@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (6, 2)], ids=["mha", "gqa4", "gqa3"])
def test_head_groupings(device, heads) -> None:
    _check(_spec(heads=heads), BATCHES["mixed"], device)
    _check(_spec(heads=heads), BATCHES["decode"], device)


@pytest.mark.parametrize("features", [dict(sliding_window=8), dict(logit_softcap=5.0),
                                      dict(sliding_window=5, logit_softcap=2.0)], ids=["window", "softcap", "both"])
def test_sliding_window_and_softcap(device, features) -> None:
    _check(_spec(**features), [(40, 1), (0, 37), (17, 20)], device)
    _check(_spec(**features), [(40, 1), (3, 1), (B + 1, 1)], device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dim_that_is_not_a_power_of_two(device, dtype) -> None:
    _check(_spec(dtype, head_dim=24), BATCHES["mixed"], device)
    _check(_spec(dtype, head_dim=24), BATCHES["decode"], device)


def test_larger_block_size(device) -> None:
    _check(_spec(), [(31, 1), (32, 1), (0, 33)], device, block_size=32)


def test_layout_rejects_block_sizes_the_kernels_cannot_take(device) -> None:
    for block_size in (8, 24):
        with pytest.raises(ValueError, match="power of two"):
            TritonKVCacheLayout(KVCacheShape(1, 2, 32, torch.float32), device, block_size)


def test_layout_allocates_and_copies_blocks(device) -> None:
    layout = TritonKVCacheLayout(KVCacheShape(3, 2, 16, torch.float16), device)
    caches = layout.allocate(6)
    assert sum(c.numel() * c.element_size() for c in caches) == 6 * layout.bytes_per_block()
    assert all(c.shape == (2, 6, 2, 16, 16) and not c.any() for c in caches)
    for cache in caches:
        cache.copy_(torch.randn(cache.shape, generator=torch.Generator().manual_seed(1)).to(cache))
    before = [c.clone() for c in caches]
    layout.copy_blocks(caches, torch.tensor([0, 3]), torch.tensor([4, 1]))
    for cache, old in zip(caches, before):
        assert torch.equal(cache[:, 4], old[:, 0]) and torch.equal(cache[:, 1], old[:, 3])
        assert all(torch.equal(cache[:, b], old[:, b]) for b in (0, 2, 3, 5))


def _decode_batch_with_padding(device):
    """Three real decodes then two padding sequences (length 0, slot -1) whose inputs are all NaN."""
    spec = _spec()
    layout = TritonKVCacheLayout(KVCacheShape(1, 2, 32, spec.dtype), device)
    batch = build_paged_batch(layout, NUM_BLOCKS, spec, [(B - 1, 1), (B, 1), (5, 1)],
                              torch.Generator().manual_seed(3), device)
    kv_cache = layout.allocate(NUM_BLOCKS)[0]
    TritonPagedAttention(spec, layout).forward(batch.fill.query, batch.fill.key, batch.fill.value, kv_cache,
                                               batch.fill.metadata)
    step, pad = batch.step, 2
    nan_rows = lambda t: torch.cat([t, torch.full((pad, *t.shape[1:]), float("nan"), device=device)])  # noqa: E731
    meta = step.metadata
    metadata = AttentionMetadata(
        query_start_loc=torch.arange(3 + pad + 1, dtype=torch.int32, device=device),
        seq_lens=torch.cat([meta.seq_lens, meta.seq_lens.new_zeros(pad)]),
        block_tables=torch.cat([meta.block_tables, meta.block_tables.new_zeros(pad, meta.block_tables.shape[1])]),
        slot_mapping=torch.cat([meta.slot_mapping, meta.slot_mapping.new_full((pad,), -1)]),
        max_query_len=1, max_seq_len=meta.max_seq_len)
    return spec, layout, batch, kv_cache, metadata, nan_rows(step.query), nan_rows(step.key), nan_rows(step.value)


def test_decode_kernel_skips_padded_sequences(device) -> None:
    spec, layout, batch, kv_cache, metadata, query, key, value = _decode_batch_with_padding(device)
    out = TritonPagedAttention(spec, layout).forward(query, key, value, kv_cache, metadata)
    expected = reference_attention(batch.step.query.cpu(), batch.full_keys, batch.full_values, batch.query_lens, spec)
    assert (out[:3].double().cpu() - expected).abs().max().item() < TOLERANCE[spec.dtype]
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))  # padding rows: zeros, never NaN
    assert not kv_cache.isnan().any()  # slot -1 wrote nothing


def test_ops_on_meta_give_shapes_only() -> None:
    meta = torch.device("meta")
    spec = _spec(torch.bfloat16, sliding_window=4)
    layout = TritonKVCacheLayout(KVCacheShape(1, 2, 32, spec.dtype), meta)
    kv_cache = layout.allocate(8)[0]
    attention = TritonPagedAttention(spec, layout)
    for num_seqs, max_query_len in ((3, 1), (3, 5)):
        tokens = num_seqs * max_query_len
        metadata = AttentionMetadata(
            query_start_loc=torch.empty(num_seqs + 1, dtype=torch.int32, device=meta),
            seq_lens=torch.empty(num_seqs, dtype=torch.int32, device=meta),
            block_tables=torch.empty(num_seqs, 4, dtype=torch.int32, device=meta),
            slot_mapping=torch.empty(tokens, dtype=torch.int64, device=meta),
            max_query_len=max_query_len, max_seq_len=40)
        query = torch.empty(tokens, 4, 32, dtype=spec.dtype, device=meta)
        key = torch.empty(tokens, 2, 32, dtype=spec.dtype, device=meta)
        out = attention.forward(query, key, key, kv_cache, metadata)
        assert out.shape == (tokens, 4, 32) and out.dtype == spec.dtype and out.device == meta


def test_attention_through_torch_compile(device) -> None:
    spec = _spec(sliding_window=12)
    layout = TritonKVCacheLayout(KVCacheShape(1, 2, 32, spec.dtype), device)
    batch = build_paged_batch(layout, NUM_BLOCKS, spec, BATCHES["mixed"], torch.Generator().manual_seed(9), device)
    attention = TritonPagedAttention(spec, layout)
    caches = [layout.allocate(NUM_BLOCKS)[0] for _ in range(2)]
    for cache in caches:
        attention.forward(batch.fill.query, batch.fill.key, batch.fill.value, cache, batch.fill.metadata)
    step = batch.step
    compiled = torch.compile(attention.forward, backend="aot_eager", fullgraph=True)
    got = compiled(step.query, step.key, step.value, caches[0], step.metadata)
    want = attention.forward(step.query, step.key, step.value, caches[1], step.metadata)
    assert torch.equal(got, want)
    assert torch.equal(caches[0], caches[1])  # the compiled graph kept the cache write


def test_write_kv_cache_skips_negative_slots(device) -> None:
    cache = torch.zeros(2, 4, 2, B, 24, device=device)
    key = torch.randn(3, 2, 24, device=device)
    value = torch.randn(3, 2, 24, device=device)
    ops.write_kv_cache(key, value, cache, torch.tensor([17, -1, 3], device=device))
    assert torch.equal(cache[0, 1, :, 1], key[0]) and torch.equal(cache[1, 0, :, 3], value[2])
    assert int(cache.ne(0).sum()) == 2 * 2 * 2 * 24  # two tokens, keys and values, two heads each
