"""The KV-cache layout: sizes, allocation, and block copies across every layer."""

from __future__ import annotations

import pytest
import torch

from tokenmill.interfaces import KVCacheShape
from tokenmill.kv_cache_dtype import QUANTIZED_FORMATS

pytestmark = [pytest.mark.kernel, pytest.mark.paged_cache]  # kernel: runs under `--interpret` too


def _layout(backend, device, dtype=torch.float32, num_layers=3):
    return backend.kv_cache_layout(KVCacheShape(num_layers=num_layers, num_kv_heads=2, head_dim=16, dtype=dtype), device)


def test_block_size_is_positive(backend, device) -> None:
    layout = _layout(backend, device)
    assert isinstance(layout.block_size, int) and layout.block_size > 0


def test_allocate_gives_one_cache_per_layer_of_the_declared_size(backend, device) -> None:
    layout = _layout(backend, device)
    caches = layout.allocate(7)
    assert len(caches) == 3
    total = sum(c.numel() * c.element_size() for c in caches)
    assert total == 7 * layout.bytes_per_block()
    assert all(c.device.type == device.type for c in caches)


def test_copy_blocks_copies_every_layer_and_nothing_else(backend, device) -> None:
    layout = _layout(backend, device)
    caches = layout.allocate(6)
    generator = torch.Generator().manual_seed(1)
    for cache in caches:
        cache.copy_(torch.randn(cache.shape, generator=generator).to(cache))
    before = [c.clone() for c in caches]
    src = torch.tensor([0, 3], device=device)
    dst = torch.tensor([4, 1], device=device)
    layout.copy_blocks(caches, src, dst)
    # Compare through a probe written at known slots: copy each block id's bytes as a whole.
    for cache, old in zip(caches, before):
        blocks_new = _blocks(cache, layout, 6)
        blocks_old = _blocks(old, layout, 6)
        assert torch.equal(blocks_new[4], blocks_old[0])
        assert torch.equal(blocks_new[1], blocks_old[3])
        for untouched in (0, 2, 3, 5):
            assert torch.equal(blocks_new[untouched], blocks_old[untouched])


def _blocks(cache: torch.Tensor, layout, num_blocks: int) -> list[torch.Tensor]:
    """Each block's contents, found by the dimension of size num_blocks (layouts order dims freely)."""
    dim = next(i for i, size in enumerate(cache.shape) if size == num_blocks)
    return [cache.select(dim, b) for b in range(num_blocks)]


def test_a_quantized_cache_takes_one_byte_an_element_and_its_scales(backend, device) -> None:
    """Each one-byte format the layout declares: blocks of about half the bfloat16 size (the scales are what
    is over), so the same memory holds about twice the blocks; allocation matches the declared size."""
    def layout(cache_dtype):
        return backend.kv_cache_layout(KVCacheShape(3, 2, 64, torch.bfloat16, cache_dtype), device)

    formats = [name for name in layout("auto").cache_dtypes if name in QUANTIZED_FORMATS]
    if not formats:
        pytest.skip("the backend's KV layout stores no one-byte format (KVCacheLayout.cache_dtypes)")
    bf16_bytes = layout("auto").bytes_per_block()
    for name in formats:
        quantized = layout(name)
        assert quantized.block_size == layout("auto").block_size
        assert quantized.bytes_per_block() * 1.8 <= bf16_bytes, name
        caches = quantized.allocate(5)
        assert sum(c.numel() * c.element_size() for c in caches) == 5 * quantized.bytes_per_block()
