"""Attention numerics over the paged cache, against a float64 reference.

Each case runs a ragged batch in which the earlier context of every sequence was written by the
backend's own kernels in a first call, then checks the second call's output (and the first's).
"""

from __future__ import annotations

import pytest
import torch

from tokenmill.conformance.plugin import dtypes_under_test
from tokenmill.conformance.reference import build_paged_batch, reference_attention
from tokenmill.interfaces import AttentionSpec, KVCacheShape
from tokenmill.kv_cache_dtype import AUTO, QUANTIZED_FORMATS, SCALES_PER_TOKEN_HEAD, resolve_kv_cache_dtype, round_trip

pytestmark = [pytest.mark.kernel, pytest.mark.paged_cache]  # kernel: runs under `--interpret` too

NUM_BLOCKS = 96


def _tolerance(dtype: torch.dtype) -> float:
    return 2e-4 if dtype == torch.float32 else 3e-2


def _batches(block_size: int) -> dict[str, list[tuple[int, int]]]:
    """(num_cached, num_new) per sequence; lengths chosen around the backend's block size."""
    b = block_size
    return {
        "prefill_one": [(0, b + 3)],
        "prefill_ragged": [(0, 1), (0, b - 1), (0, b), (0, b + 1), (0, 2 * b + 5)],
        "decode": [(1, 1), (b - 1, 1), (b, 1), (2 * b + 2, 1), (3 * b - 1, 1)],
        "chunked_prefill": [(b, b), (b + 3, 2 * b - 1), (5, 7)],
        "mixed": [(2 * b + 1, 1), (0, b + 2), (b - 1, 1), (7, b + 9), (3 * b, 1)],
        # Speculative decoding's verification: each decoding sequence feeds its last token and a few
        # draft tokens over its context, beside plain decodes.
        "multi_token_decode": [(2 * b + 1, 4), (b - 1, 2), (b, 4), (3 * b - 1, 1), (5, 3), (b - 3, 4)],
    }


def _check_step(attention, step, kv_cache, expected, dtype):
    attention.prepare(step.metadata)
    out = attention.forward(step.query, step.key, step.value, kv_cache, step.metadata)
    assert out.shape == step.query.shape
    error = (out.double().cpu() - expected).abs().max().item()
    assert error < _tolerance(dtype), f"max abs error {error:.2e}"


def _run_case(backend, device, dtype, seqs, rejected=0, cache_dtype=AUTO, **spec_kwargs):
    """`cache_dtype`: the cache stores that (`KVCacheShape.cache_dtype`), and the reference attends over keys and
    values rounded as tokenmill.kv_cache_dtype rounds them."""
    heads, kv_heads = spec_kwargs.pop("heads", (4, 2))
    spec = AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=32, scale=32**-0.5, dtype=dtype,
                         **spec_kwargs)
    layout = backend.kv_cache_layout(KVCacheShape(1, kv_heads, 32, dtype, cache_dtype), device)
    kv_cache = layout.allocate(NUM_BLOCKS)[0]
    attention = backend.attention(spec, layout)
    batch = build_paged_batch(layout, NUM_BLOCKS, spec, seqs, torch.Generator().manual_seed(len(seqs)), device,
                              rejected)

    def stored(tensors):
        return [round_trip(t, cache_dtype) for t in tensors]

    if batch.fill is not None:
        fill_lens = [c + rejected for c, _ in seqs if c]
        expected = reference_attention(batch.fill.query.cpu(), stored(batch.fill_keys), stored(batch.fill_values),
                                       fill_lens, spec)
        _check_step(attention, batch.fill, kv_cache, expected, dtype)
    expected = reference_attention(batch.step.query.cpu(), stored(batch.full_keys), stored(batch.full_values),
                                   batch.query_lens, spec)
    _check_step(attention, batch.step, kv_cache, expected, dtype)


@pytest.mark.parametrize("case", ["prefill_one", "prefill_ragged", "decode", "chunked_prefill", "mixed",
                                  "multi_token_decode"])
def test_attention_matches_reference(backend, platform, device, case) -> None:
    block_size = backend.kv_cache_layout(KVCacheShape(1, 2, 32, torch.float32), device).block_size
    for dtype in dtypes_under_test(platform):
        _run_case(backend, device, dtype, _batches(block_size)[case])


@pytest.mark.parametrize("case", ["mixed", "multi_token_decode"])
def test_attention_over_a_quantized_cache_matches_the_dequantized_reference(backend, platform, device, case) -> None:
    """Every cache dtype the layout declares besides the model's (`KVCacheLayout.cache_dtypes`): written by the
    backend, read by its attention, as exact as attention over the keys and values the format rounds to."""
    layout = backend.kv_cache_layout(KVCacheShape(1, 2, 32, torch.float32), device)
    cache_dtypes = [name for name in layout.cache_dtypes if name != AUTO]
    if not cache_dtypes:
        pytest.skip("the backend's KV layout stores only the model's dtype (KVCacheLayout.cache_dtypes)")
    if any(name in QUANTIZED_FORMATS for name in cache_dtypes):
        assert layout.kv_scales == SCALES_PER_TOKEN_HEAD, (
            f"kv_scales {layout.kv_scales!r}: the reference rounds with a scale per token and kv head")
    for dtype in dtypes_under_test(platform):
        for cache_dtype in cache_dtypes:
            if resolve_kv_cache_dtype(cache_dtype, dtype) != AUTO:
                _run_case(backend, device, dtype, _batches(layout.block_size)[case], cache_dtype=cache_dtype)


def test_attention_overwrites_rejected_draft_tokens(backend, platform, device) -> None:
    """After a verification rejected draft tokens, the next step writes its own tokens over their cache slots
    (the context's length tells where it ends, nothing is cleared): attention sees only the new ones."""
    block_size = backend.kv_cache_layout(KVCacheShape(1, 2, 32, torch.float32), device).block_size
    b = block_size
    for dtype in dtypes_under_test(platform):
        _run_case(backend, device, dtype, [(b - 2, 1), (2 * b + 1, 4), (5, 3), (b, 2)], rejected=3)


@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (6, 2)], ids=["mha", "mqa", "gqa3"])
def test_attention_head_groupings(backend, platform, device, heads) -> None:
    for dtype in dtypes_under_test(platform):
        _run_case(backend, device, dtype, [(3, 1), (0, 9), (20, 4)], heads=heads)


def test_attention_sliding_window(backend, platform, device) -> None:
    for dtype in dtypes_under_test(platform):
        _run_case(backend, device, dtype, [(40, 1), (0, 37), (17, 20)], sliding_window=8)


def test_attention_logit_softcap(backend, platform, device) -> None:
    for dtype in dtypes_under_test(platform):
        _run_case(backend, device, dtype, [(30, 1), (0, 12)], logit_softcap=5.0)


@pytest.mark.parametrize("field, value", [("sliding_window", 6), ("logit_softcap", 5.0)])
@pytest.mark.parametrize("seqs", [[(0, 30), (0, 5)], [(0, 30)], [(30, 1), (12, 1)]], ids=["prefills", "prompt", "decodes"])
def test_layers_with_different_specs_share_one_step(backend, device, field, value, seqs) -> None:
    """Layers that differ in one spec field (Gemma 2: window, soft caps), prepared on one shared metadata
    object as the engine does: whatever a backend builds once per step must not leak between them."""
    dtype = torch.float32
    layout = backend.kv_cache_layout(KVCacheShape(2, 2, 32, dtype), device)
    caches = layout.allocate(NUM_BLOCKS)
    specs = [AttentionSpec(4, 2, 32, 32**-0.5, dtype, **{field: v}) for v in (None, value)]
    batch = build_paged_batch(layout, NUM_BLOCKS, specs[0], seqs, torch.Generator().manual_seed(5), device)
    step = batch.step
    attentions = [backend.attention(spec, layout) for spec in specs]
    for attention in attentions:
        attention.prepare(step.metadata)
    for spec, attention, cache in zip(specs, attentions, caches):
        if batch.fill is not None:  # each layer's own cache holds the earlier context
            attention.forward(batch.fill.query, batch.fill.key, batch.fill.value, cache, batch.fill.metadata)
        out = attention.forward(step.query, step.key, step.value, cache, step.metadata)
        expected = reference_attention(step.query.cpu(), batch.full_keys, batch.full_values, batch.query_lens, spec)
        assert (out.double().cpu() - expected).abs().max().item() < _tolerance(dtype)
