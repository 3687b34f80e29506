"""Continuous batching, chunked prefill, preemption and buckets, driven with fake model outputs."""

from __future__ import annotations

import random

from tokenmill.block_manager import BlockManager
from tokenmill.interfaces import ShapeBuckets
from tokenmill.request import FinishReason, Request
from tokenmill.scheduler import Scheduler, SchedulerConfig


class FakeParams:
    def __init__(self, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens


def _scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=16, buckets=None) -> Scheduler:
    return Scheduler(SchedulerConfig(budget, max_seqs), BlockManager(num_blocks, block_size), buckets)


def _add(scheduler: Scheduler, name: str, prompt_len: int, max_new: int, arrival: int) -> Request:
    request = Request(name, [(arrival * 31 + i) % 97 for i in range(prompt_len)], FakeParams(max_new), arrival)
    scheduler.add_request(request)
    return request


def _step(scheduler: Scheduler, rng: random.Random) -> list[Request]:
    """One step with fake sampling; returns the requests that finished."""
    output = scheduler.schedule()
    sampled = {s.request.request_id: [rng.randrange(97)] for s in output.scheduled
               if s.request.num_computed_tokens + s.num_new_tokens == s.request.num_tokens}
    scheduler.update(output, sampled)
    finished = []
    for s in output.scheduled:
        r = s.request
        if not r.is_finished and r.num_output_tokens >= r.sampling_params.max_new_tokens:
            scheduler.finish(r, FinishReason.LENGTH)
            finished.append(r)
    return finished + output.failed


def test_a_request_added_later_joins_the_next_step() -> None:
    scheduler, rng = _scheduler(), random.Random(0)
    first = _add(scheduler, "a", 5, 10, 0)
    _step(scheduler, rng)
    second = _add(scheduler, "b", 5, 10, 1)
    output = scheduler.schedule()
    assert {s.request.request_id for s in output.scheduled} == {"a", "b"}
    assert first.num_output_tokens == 1 and second.num_output_tokens == 0


def test_a_long_prompt_is_chunked_while_decodes_keep_going() -> None:
    scheduler, rng = _scheduler(num_blocks=2000, budget=256, max_seqs=16), random.Random(1)
    decoders = [_add(scheduler, f"d{i}", 8, 400, i) for i in range(8)]
    _step(scheduler, rng)  # prefill the eight
    long = _add(scheduler, "long", 4000, 4, 100)
    steps_while_prefilling = 0
    while long.num_computed_tokens < long.num_prompt_tokens:
        before = [d.num_output_tokens for d in decoders]
        _step(scheduler, rng)
        record = scheduler.step_records[-1]
        assert record.num_decode_tokens == 8 and "long" in record.request_ids
        assert [d.num_output_tokens for d in decoders] == [b + 1 for b in before]
        steps_while_prefilling += 1
    assert steps_while_prefilling > 1  # the prompt really was split


def test_preemption_with_a_tiny_cache_finishes_everything_and_frees_every_block() -> None:
    scheduler, rng = _scheduler(num_blocks=24, block_size=4, budget=64, max_seqs=32), random.Random(2)
    requests = [_add(scheduler, f"r{i}", rng.randrange(2, 30), rng.randrange(1, 40), i) for i in range(32)]
    for _ in range(20_000):
        if not scheduler.has_unfinished():
            break
        _step(scheduler, rng)
    assert not scheduler.has_unfinished()
    assert all(r.finish_reason is FinishReason.LENGTH for r in requests)
    assert all(r.num_output_tokens == r.sampling_params.max_new_tokens for r in requests)
    assert scheduler.num_preemptions > 0
    assert scheduler.blocks.num_free_blocks == 24


def test_a_request_larger_than_the_cache_fails_instead_of_hanging() -> None:
    scheduler, rng = _scheduler(num_blocks=4, block_size=4), random.Random(3)
    request = _add(scheduler, "huge", 40, 1, 0)
    finished = _step(scheduler, rng)
    assert finished == [request] and request.finish_reason is FinishReason.ERROR
    assert "KV-cache blocks" in request.finish_message


def test_random_workload_keeps_block_accounting_consistent() -> None:
    rng = random.Random(4)
    scheduler = _scheduler(num_blocks=48, block_size=4, budget=40, max_seqs=12)
    arrival = 0
    for _ in range(3000):
        if rng.random() < 0.3:
            _add(scheduler, f"q{arrival}", rng.randrange(1, 50), rng.randrange(1, 30), arrival)
            arrival += 1
        if rng.random() < 0.02 and scheduler.running:
            scheduler.finish(rng.choice(scheduler.running), FinishReason.ABORTED)
        _step(scheduler, rng)
        held = [b for r in scheduler.running for b in r.block_ids]
        counts = {b: held.count(b) for b in set(held)}
        assert all(scheduler.blocks.ref_counts[b] == n for b, n in counts.items())
        assert scheduler.blocks.num_free_blocks + len(counts) == 48
    while scheduler.has_unfinished():
        _step(scheduler, rng)
    assert scheduler.blocks.num_free_blocks == 48


def test_shape_buckets_cap_and_pad_each_step() -> None:
    buckets = ShapeBuckets(num_tokens=(8, 16, 32), num_seqs=(1, 2, 4))
    scheduler, rng = _scheduler(budget=512, max_seqs=64, buckets=buckets), random.Random(5)
    for i in range(6):
        _add(scheduler, f"b{i}", 10, 3, i)
    while scheduler.has_unfinished():
        output = scheduler.schedule()
        if output.scheduled:
            assert output.num_tokens <= 32 and len(output.scheduled) <= 4
            assert output.padded_num_tokens in buckets.num_tokens and output.padded_num_tokens >= output.num_tokens
            assert output.padded_num_seqs in buckets.num_seqs
        sampled = {s.request.request_id: [1] for s in output.scheduled
                   if s.request.num_computed_tokens + s.num_new_tokens == s.request.num_tokens}
        scheduler.update(output, sampled)
        for s in output.scheduled:
            if s.request.num_output_tokens >= 3:
                scheduler.finish(s.request, FinishReason.LENGTH)


def test_a_request_outgrowing_the_cache_fails_without_prefix_caching_too() -> None:
    scheduler = Scheduler(SchedulerConfig(32, 16), BlockManager(4, 4, enable_prefix_caching=False))
    request = _add(scheduler, "grows", 10, 20, 0)  # fits at first, needs 8 blocks by the end
    rng = random.Random(6)
    for _ in range(200):
        if not scheduler.has_unfinished():
            break
        _step(scheduler, rng)
    assert request.finish_reason is FinishReason.ERROR and "KV-cache blocks" in request.finish_message
    assert scheduler.blocks.num_free_blocks == 4


def test_drafts_ride_with_the_last_token_and_rejected_ones_give_their_blocks_back() -> None:
    """Random drafts, random verdicts, a small cache and budget (preemptions, cut drafts): every step feeds a
    decoding request its last token and what fits of its draft, every verdict leaves exactly the blocks of
    the kept tokens (none past the sequence), and every block comes back."""
    scheduler, rng = _scheduler(num_blocks=40, block_size=4, budget=20, max_seqs=8), random.Random(3)
    requests = [_add(scheduler, f"r{i}", rng.randrange(2, 20), rng.randrange(1, 30), i) for i in range(16)]
    for _ in range(5_000):
        if not scheduler.has_unfinished():
            break
        for r in scheduler.running:
            if r.num_tokens - r.num_computed_tokens == 1:
                left = r.sampling_params.max_new_tokens - r.num_output_tokens
                r.draft_token_ids = [rng.randrange(97) for _ in range(rng.randrange(0, min(4, left)))]
        output = scheduler.schedule()
        sampled = {}
        for s in output.scheduled:
            r = s.request
            assert s.num_new_tokens <= r.num_pending_tokens
            if s.num_new_tokens == r.num_pending_tokens:  # it samples: keep some of the draft, then one more
                sampled[r.request_id] = r.draft_token_ids[: rng.randrange(len(r.draft_token_ids) + 1)] + [5]
            else:
                assert not r.draft_token_ids  # a cut step carries no draft
        scheduler.update(output, sampled)
        for s in output.scheduled:
            r = s.request
            if r.request_id in sampled:
                assert r.num_computed_tokens == r.num_tokens - 1 and not r.draft_token_ids
                blocks = scheduler.blocks
                assert blocks.blocks_needed(r.num_computed_tokens) <= len(r.block_ids) <= blocks.blocks_needed(r.num_tokens)
            if not r.is_finished and r.num_output_tokens >= r.sampling_params.max_new_tokens:
                scheduler.finish(r, FinishReason.LENGTH)
    assert all(r.is_finished for r in requests)
    assert scheduler.blocks.num_free_blocks == 40
