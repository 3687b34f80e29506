"""Blocks, reference counts and the prefix-cache hash chain (pure Python, no device)."""

from __future__ import annotations

from tokenmill.block_manager import BlockManager
from tokenmill.request import Request


def _request(tokens, name="r") -> Request:
    return Request(name, list(tokens), None)


def _compute(manager: BlockManager, request: Request, n: int) -> None:
    assert manager.append(request, n)
    request.num_computed_tokens += n
    manager.commit_full_blocks(request)


def test_allocation_and_free_return_every_block() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    request = _request(range(10))
    _compute(manager, request, 10)
    assert len(request.block_ids) == 3 and manager.num_free_blocks == 5
    manager.free_request(request)
    assert manager.num_free_blocks == 8 and manager.usage == 0.0


def test_a_shared_prefix_reuses_full_blocks_but_never_the_last_token() -> None:
    manager = BlockManager(num_blocks=16, block_size=4)
    first = _request(range(12), "a")
    _compute(manager, first, 12)
    second = _request(list(range(12)) + [99, 98], "b")
    assert manager.allocate_prefix(second) == 12
    assert second.block_ids == first.block_ids
    assert all(manager.ref_counts[b] == 2 for b in first.block_ids)
    same = _request(range(12), "c")  # identical prompt: its last block must still be computed
    assert manager.allocate_prefix(same) == 8


def test_freed_blocks_stay_cached_until_reused() -> None:
    manager = BlockManager(num_blocks=4, block_size=4)
    first = _request(range(9), "a")
    _compute(manager, first, 9)
    manager.free_request(first)
    again = _request(range(9), "b")
    assert manager.allocate_prefix(again) == 8
    manager.free_request(again)
    filler = _request(range(100, 116), "c")  # takes every block, evicting the cached ones
    _compute(manager, filler, 16)
    manager.free_request(filler)
    assert manager.allocate_prefix(_request(range(9), "d")) == 0


def test_append_fails_cleanly_when_blocks_run_out() -> None:
    manager = BlockManager(num_blocks=2, block_size=4)
    request = _request(range(12))
    assert not manager.append(request, 12)
    assert request.block_ids == [] and manager.num_free_blocks == 2


def test_untouched_blocks_are_used_first_without_a_resident_limit() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    first = _request(range(8), "a")
    _compute(manager, first, 8)
    manager.free_request(first)
    second = _request(range(100, 108), "b")
    _compute(manager, second, 8)
    assert not set(first.block_ids) & set(second.block_ids)
    assert manager.allocate_prefix(_request(range(9), "c")) == 8  # the first prompt is still cached


def test_beyond_the_resident_limit_freed_blocks_are_reused_before_untouched_ones() -> None:
    # The CPU cache commits memory on first write, so serving one request after another must keep
    # writing the same few blocks rather than walk through the whole pool.
    manager = BlockManager(num_blocks=64, block_size=4, resident_limit=2)
    touched: set[int] = set()
    for index in range(20):
        request = _request(range(index * 100, index * 100 + 10), f"r{index}")
        _compute(manager, request, 10)
        touched.update(request.block_ids)
        manager.free_request(request)
    assert len(touched) == 3
    both = [_request(range(1000, 1010), "x"), _request(range(2000, 2010), "y")]
    for request in both:
        _compute(manager, request, 10)
        touched.update(request.block_ids)
    assert len(touched) == 6 and manager.num_free_blocks == 58
