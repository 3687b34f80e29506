"""The gaudi backend's shape buckets: ramps, the scheduler's limits, environment overrides, and real
steps padded into them by the core's `StepPadding`."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tokenmill.model_runner import SequenceStep, StepPadding, build_step_inputs
from tokenmill.plugins.gaudi.buckets import BLOCKS_ENV, SEQS_ENV, TOKENS_ENV, Ramp, shape_buckets


@pytest.mark.parametrize("ramp, sizes", [
    (Ramp(1, 32, 128), (1, 2, 4, 8, 16, 32, 64, 96, 128)),  # doubling below STEP, then every STEP
    (Ramp(128, 512, 2048), (128, 256, 512, 1024, 1536, 2048)),
    (Ramp(3, 4, 10), (3, 4, 8, 10)),  # MAX is always a bucket, even off the ramp
    (Ramp(1, 1000, 100), (1, 2, 4, 8, 16, 32, 64, 100)),  # STEP past MAX: doubling only
    (Ramp(5, 5, 5), (5,)),
])
def test_ramps_double_then_step_up_to_their_maximum(ramp: Ramp, sizes: tuple[int, ...]) -> None:
    assert ramp.sizes() == sizes


def test_default_buckets_reach_the_scheduler_limits() -> None:
    buckets = shape_buckets(2048, 128, {})
    assert buckets.num_tokens == (128, 256, 512, 1024, 1536, 2048)
    assert buckets.num_seqs == (1, 2, 4, 8, 16, 32, 64, 96, 128)
    assert buckets.blocks_per_seq == tuple(2**i for i in range(14))  # up to 8,192 blocks: the core clamps


def test_limits_below_the_default_ramps_become_the_only_buckets() -> None:
    buckets = shape_buckets(100, 3, {})
    assert buckets.num_tokens == (100,) and buckets.num_seqs == (1, 2, 3)


def test_environment_ramps_override_the_defaults_and_are_capped_at_the_limits() -> None:
    env = {TOKENS_ENV: "16:64:256", SEQS_ENV: "::8", BLOCKS_ENV: "2:8:40"}
    buckets = shape_buckets(200, 64, env)
    assert buckets.num_tokens == (16, 32, 64, 128, 192, 200)  # MAX 256 capped at the token budget
    assert buckets.num_seqs == (1, 2, 4, 8)  # empty fields keep MIN 1 and STEP 32
    assert buckets.blocks_per_seq == (2, 4, 8, 16, 24, 32, 40)
    assert shape_buckets(200, 64, {TOKENS_ENV: ""}) == shape_buckets(200, 64, {})  # empty: the defaults


@pytest.mark.parametrize("variable, value, message", [
    (TOKENS_ENV, "abc", "expected MIN:STEP:MAX"),
    (SEQS_ENV, "1:2", "expected MIN:STEP:MAX"),
    (BLOCKS_ENV, "1:x:4", "expected MIN:STEP:MAX"),
    (TOKENS_ENV, "0:1:4", "1 <= MIN <= MAX"),
    (SEQS_ENV, "8:1:4", "1 <= MIN <= MAX"),
    (BLOCKS_ENV, "1:0:4", "STEP >= 1"),
    (TOKENS_ENV, "512::4096", "above the scheduler's token budget"),
    (SEQS_ENV, "65::128", "above the scheduler's sequence limit"),
])
def test_invalid_ramps_are_refused_naming_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        shape_buckets(256, 64, {variable: value})
    assert variable in str(error.value)


def _padding(max_model_len: int = 1000, block_size: int = 128) -> StepPadding:
    buckets = shape_buckets(256, 16, {TOKENS_ENV: "8:64:"})
    return StepPadding(buckets, math.ceil(max_model_len / block_size), max_model_len, block_size)


def test_generated_width_buckets_are_clamped_to_the_model_context() -> None:
    assert _padding().widths == (1, 2, 4, 8)
    assert _padding(max_model_len=5000).widths == (1, 2, 4, 8, 16, 32, 40)


def test_real_steps_pad_to_the_smallest_generated_buckets_that_hold_them() -> None:
    padding, block_size = _padding(), 128
    buckets = padding.buckets
    rng = random.Random(0)
    for _ in range(300):
        steps = []
        for _ in range(rng.randint(1, 16)):
            start = rng.randrange(0, 900)
            n = 1 if rng.random() < 0.6 else rng.randint(2, 60)
            steps.append(SequenceStep([1] * n, start, list(range(math.ceil((start + n) / block_size))), 1))
        while sum(len(s.token_ids) for s in steps) > 256:
            steps.pop()
        inputs = build_step_inputs(steps, block_size, torch.device("cpu"), padding)
        meta = inputs.metadata
        num_tokens, width = sum(len(s.token_ids) for s in steps), max(len(s.block_table) for s in steps)
        assert inputs.input_ids.shape[0] == buckets.pad_num_tokens(num_tokens)
        assert meta.num_seqs == buckets.pad_num_seqs(len(steps))
        assert meta.block_tables.shape[1] == next(w for w in padding.widths if w >= width)
        assert meta.max_seq_len == min(meta.block_tables.shape[1] * block_size, 1000)
        assert meta.max_seq_len >= int(meta.seq_lens.max())
        assert meta.slot_mapping[num_tokens:].eq(-1).all() and meta.seq_lens[len(steps):].eq(0).all()
