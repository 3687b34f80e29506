"""Prompt chunks beside running decodes are cut to what keeps a step near its target (`--step-target-ms`),
learnt from the steps so far; timings here are fed by hand, so every figure is exact."""

from __future__ import annotations

import random

import pytest

from tokenmill.block_manager import BlockManager
from tokenmill.prefill_pacing import MIN_OBSERVED_PREFILL, PATIENCE_TARGETS, PrefillPacer
from tokenmill.scheduler import Scheduler, SchedulerConfig
from tests.engine.test_scheduler import _add, _step


def test_the_pacer_gives_prompts_the_time_the_decodes_leave() -> None:
    pacer = PrefillPacer(target_s=0.1, floor_tokens=16)
    assert pacer.prefill_tokens(2048) == 2048  # nothing learnt yet: the budget is not cut
    pacer.observe(0, 16, 0.020)  # 16 decodes alone: 20 ms
    pacer.observe(1000, 0, 0.200)  # a prompt alone: 0.2 ms a token
    assert pacer.prefill_tokens(2048) == 400  # (100 - 20) ms / 0.2 ms
    assert pacer.prefill_tokens(300) == 300  # never past the step's budget
    pacer.observe(400, 16, 0.100)  # beside the decodes the decodes' 20 ms are not the prompt's
    assert pacer.prefill_token_s == pytest.approx(0.0002)


def test_past_half_the_target_prompts_get_as_long_as_the_decodes_and_at_least_the_floor() -> None:
    pacer = PrefillPacer(target_s=0.1, floor_tokens=64)
    pacer.observe(0, 64, 0.250)  # a big model's 64 streams alone take 250 ms
    pacer.observe(500, 0, 0.500)  # 1 ms a prompt token
    assert pacer.prefill_tokens(2048) == 250  # a paced step at most doubles a stream's gap
    pacer.prefill_token_s = 0.010  # 25 tokens would fit: the floor's 64 go
    assert pacer.prefill_tokens(2048) == 64
    assert pacer.prefill_tokens(10) == 10


def test_estimates_follow_a_change_of_load_and_ignore_tiny_prompt_steps() -> None:
    pacer = PrefillPacer(target_s=0.1, floor_tokens=16)
    pacer.observe(1000, 0, 0.100)
    pacer.observe(MIN_OBSERVED_PREFILL - 1, 0, 5.0)  # too few prompt tokens to say what one costs
    assert pacer.prefill_token_s == pytest.approx(0.0001)
    for _ in range(30):
        pacer.observe(1000, 0, 0.400)
    assert pacer.prefill_token_s == pytest.approx(0.0004, rel=1e-3)
    for seconds in (0.010, 0.050):
        for _ in range(30):
            pacer.observe(0, 8, seconds)
    assert pacer.decode_step_s == pytest.approx(0.050, rel=1e-3)


def test_a_prompt_that_has_waited_the_patience_gets_the_whole_budget() -> None:
    pacer = PrefillPacer(target_s=0.1, floor_tokens=16)
    pacer.observe(0, 64, 0.250)
    pacer.observe(500, 0, 0.500)  # 1 ms a prompt token: 250 beside the decodes
    arrived = pacer.clock_s
    assert pacer.prefill_tokens(2048, arrived) == 250
    assert PATIENCE_TARGETS * pacer.target_s == pytest.approx(1.0)
    for _ in range(3):  # 0.75 s of steps since it came: still paced
        pacer.observe(0, 64, 0.250)
        assert pacer.prefill_tokens(2048, arrived) == 250
    pacer.observe(0, 64, 0.250)
    assert pacer.prefill_tokens(2048, arrived) == 2048
    assert pacer.prefill_tokens(2048, pacer.clock_s) == 250  # a prompt that just came is paced again


def _paced(target_s: float | None, budget: int = 512) -> Scheduler:
    return Scheduler(SchedulerConfig(budget, 16, step_target_s=target_s, prefill_floor_tokens=8),
                     BlockManager(4000, 4))


def test_a_prompt_beside_decodes_is_cut_to_the_pacers_share_and_alone_takes_the_budget() -> None:
    rng = random.Random(0)
    scheduler = _paced(0.1)
    scheduler.pacer.observe(0, 4, 0.020)
    scheduler.pacer.observe(1000, 0, 0.400)  # 0.4 ms a token: 200 tokens fit beside the decodes
    alone = _add(scheduler, "alone", 700, 400, 0)
    _step(scheduler, rng)
    assert scheduler.step_records[-1].num_prefill_tokens == 512  # no decode waits: the whole budget
    while alone.num_computed_tokens < alone.num_prompt_tokens:
        _step(scheduler, rng)
    long = _add(scheduler, "long", 1000, 4, 1)
    fed = []
    while long.num_computed_tokens < long.num_prompt_tokens:
        _step(scheduler, rng)
        record = scheduler.step_records[-1]
        assert record.num_decode_tokens == 1  # "alone" kept decoding every step
        fed.append(record.num_prefill_tokens)
    assert fed == [200] * 5


def test_two_waiting_prompts_share_one_paced_allowance() -> None:
    rng = random.Random(1)
    scheduler = _paced(0.1)
    _add(scheduler, "decoder", 8, 400, 0)
    _step(scheduler, rng)
    scheduler.pacer.observe(0, 1, 0.010)
    scheduler.pacer.observe(900, 0, 0.180)  # 0.2 ms a token: 450 tokens beside the decode
    _add(scheduler, "a", 300, 4, 1)
    _add(scheduler, "b", 300, 4, 2)
    _step(scheduler, rng)
    record = scheduler.step_records[-1]
    assert record.num_prefill_tokens == 450 and set(record.request_ids) == {"decoder", "a", "b"}


def test_without_a_target_prompts_beside_decodes_take_the_whole_budget() -> None:
    rng = random.Random(2)
    scheduler = _paced(None)
    assert scheduler.pacer is None
    _add(scheduler, "decoder", 8, 400, 0)
    _step(scheduler, rng)
    _add(scheduler, "long", 2000, 4, 1)
    _step(scheduler, rng)
    assert scheduler.step_records[-1].num_prefill_tokens == 511


def test_observe_step_feeds_the_pacer_the_last_steps_counts() -> None:
    rng = random.Random(3)
    scheduler = _paced(0.1)
    _add(scheduler, "a", 100, 3, 0)
    _step(scheduler, rng)
    scheduler.observe_step(0.050)
    assert scheduler.pacer.prefill_token_s == pytest.approx(0.0005)
    _step(scheduler, rng)
    scheduler.observe_step(0.004)
    assert scheduler.pacer.decode_step_s == pytest.approx(0.004)


def test_the_engine_times_each_step_for_the_pacer() -> None:
    from tests.tiny_models import build_tiny
    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.sampling_params import SamplingParams

    config = EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=4 << 20, progress=False, step_target_s=0.1)
    engine = Engine(config, checkpoint=build_tiny("llama").checkpoint())
    engine.generate([list(range(5, 5 + MIN_OBSERVED_PREFILL))], SamplingParams(max_new_tokens=3, ignore_eos=True))
    pacer = engine.scheduler.pacer
    assert pacer.prefill_token_s is not None and pacer.decode_step_s is not None  # both kinds of step seen


def test_a_slow_models_queued_prompts_are_fed_whole_once_they_have_waited() -> None:
    rng = random.Random(4)
    scheduler = _paced(0.1, budget=2048)
    for index in range(4):
        _add(scheduler, f"decoder{index}", 8, 400, index)
    _step(scheduler, rng)
    scheduler.pacer.observe(0, 4, 0.300)  # the decodes alone outlast the target, as the 1B's 64 streams do
    scheduler.pacer.observe(1000, 0, 1.000)  # 1 ms a token: 300 tokens beside the decodes
    long = _add(scheduler, "long", 3000, 4, 4)
    fed = []
    while long.num_computed_tokens < long.num_prompt_tokens:
        _step(scheduler, rng)
        record = scheduler.step_records[-1]
        assert record.num_decode_tokens == 4
        fed.append(record.num_prefill_tokens)
        scheduler.observe_step(0.300 + record.num_prefill_tokens * 0.001)
    # Paced while it waited under 1 s (two steps of 0.6 s), then the whole budget a step.
    assert fed == [300, 300, 2044, 356]
