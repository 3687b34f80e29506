"""A backend whose model owns its KV cache in fixed slots (`SlotModel`): the engine schedules over the slots.

The model is the example plugin's (`examples/tokenmill-example-backend`, `slots.py`): tokenmill's own model
over a cache addressed by slot, which refuses a step that feeds a slot out of order or reuses it unfreed.
"""

from __future__ import annotations

import importlib
import logging
import random

import pytest

from tests.tiny_models import VOCAB, build_tiny
from tokenmill import hookimpl
from tokenmill.backend import Backend
from tokenmill.block_manager import BlockManager
from tokenmill.engine import Engine, EngineConfig
from tokenmill.errors import ValidationError
from tokenmill.registry import load_registry
from tokenmill.request import FinishReason, Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler import Scheduler, SchedulerConfig
from tokenmill.slots import PREFIX_CACHING_UNAVAILABLE

pytestmark = pytest.mark.usefixtures("example_plugin_installed")

NUM_SLOTS = 3
BUDGET = 40  # tokens per step


class SlotPlugin:
    """The example's slot model with chosen capabilities, registered under its own name."""

    def __init__(self, **capabilities):
        importlib.invalidate_caches()  # the package was pip-installed after this process started
        self.slots = importlib.import_module("tokenmill_example_backend.slots")
        self.capabilities = capabilities

    @hookimpl
    def tokenmill_discover(self):
        return self.slots.tokenmill_discover()

    @hookimpl
    def tokenmill_init_device(self, device_index):
        return self.slots.tokenmill_init_device(device_index)

    @hookimpl
    def tokenmill_model_executor(self, checkpoint, dtype, device, max_model_len):
        return self.slots.SlotCachedModel(checkpoint, dtype, device, NUM_SLOTS, max_model_len, **self.capabilities)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama")


def _engine(tiny, enable_prefix_caching=True, **capabilities) -> Engine:
    backend = Backend(load_registry([("slots-under-test", SlotPlugin(**capabilities))]), "slots-under-test")
    config = EngineConfig(backend="slots-under-test", dtype="float32", progress=False, max_num_batched_tokens=BUDGET,
                          enable_prefix_caching=enable_prefix_caching)
    return Engine(config, backend=backend, checkpoint=tiny.checkpoint())


def _tokens(outputs) -> list[int]:
    return [t.id for o in outputs for t in o.new_tokens]


@pytest.mark.parametrize("mixes,chunked", [(True, True), (False, False)], ids=["mixed-chunked", "apart-whole"])
def test_more_requests_than_slots_all_finish_with_the_reference_tokens(tiny, mixes, chunked) -> None:
    engine = _engine(tiny, mixes_prefill_and_decode=mixes, chunked_prefill=chunked)
    rng = random.Random(3)
    longest = 90 if chunked else BUDGET  # a prompt fed whole must fit one step
    requests = [(f"r{i}", [rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, longest))], rng.randrange(1, 14))
                for i in range(8)]
    arrivals = {0: requests[:5], 4: requests[5:7], 9: requests[7:]}
    results = {request_id: [] for request_id, _, _ in requests}
    step, waited, most_running = 0, False, 0
    while step <= max(arrivals) or engine.has_unfinished():
        for request_id, prompt, max_new in arrivals.get(step, []):
            engine.add_request(request_id, prompt, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
        for out in engine.step():
            results[out.request_id].append(out)
        waited |= engine.scheduler.num_waiting > 0
        most_running = max(most_running, engine.scheduler.num_running)
        step += 1
    for request_id, prompt, max_new in requests:
        assert results[request_id][-1].finished
        assert _tokens(results[request_id]) == tiny.greedy(prompt, max_new), request_id
    assert waited and most_running == NUM_SLOTS  # the slots bounded the batch, the rest queued
    records = list(engine.scheduler.step_records)
    mixed_steps = [r for r in records if r.num_prefill_tokens and r.num_decode_tokens]
    assert bool(mixed_steps) == mixes
    assert engine.block_manager.num_free_blocks == NUM_SLOTS
    assert engine.model.lengths == [0] * NUM_SLOTS  # every slot was freed back to the model


def test_an_aborted_request_frees_its_slot_for_the_next(tiny) -> None:
    engine = _engine(tiny)
    rng = random.Random(5)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(20)] for _ in range(NUM_SLOTS + 1)]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    outputs = {f"r{i}": [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.scheduler.num_running < NUM_SLOTS or not outputs["r0"]:  # every slot taken, r0 decoding
        for out in engine.step():
            outputs[out.request_id].append(out)
    assert engine.scheduler.num_waiting == 1
    engine.abort("r0")  # mid-decode: its slot holds tokens the next request must not see
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    for i in range(1, len(prompts)):
        assert _tokens(outputs[f"r{i}"]) == tiny.greedy(prompts[i], 30)
    assert engine.model.lengths == [0] * NUM_SLOTS


def test_prefix_caching_is_reported_unavailable(tiny, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="tokenmill.engine"):
        engine = _engine(tiny, enable_prefix_caching=True)
    assert f"prefix caching: {PREFIX_CACHING_UNAVAILABLE}" in caplog.text
    assert engine.prefix_caching == PREFIX_CACHING_UNAVAILABLE
    assert engine.prefix_cache_hit_rate is None  # no rate to report, not a rate of 0
    assert engine.model_implementation == "backend"  # /info says the backend's own model runs
    prompt = list(range(4, 60))
    first, second = engine.generate([prompt, prompt], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert first[-1].num_cached_tokens == second[-1].num_cached_tokens == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenmill.engine"):
        _engine(tiny, enable_prefix_caching=False)
    assert "prefix caching" not in caplog.text  # nothing asked for, nothing to warn about


def test_a_prompt_over_the_step_budget_is_refused_when_it_cannot_be_split(tiny) -> None:
    engine = _engine(tiny, chunked_prefill=False)
    with pytest.raises(ValidationError, match=f"at most {BUDGET} tokens"):
        engine.add_request("long", list(range(4, 4 + BUDGET + 1)), SamplingParams(max_new_tokens=1))
    assert _tokens(engine.generate([list(range(4, 4 + BUDGET))], SamplingParams(max_new_tokens=1))[0])


def test_the_scheduler_fails_a_whole_prompt_no_step_can_hold() -> None:
    # The engine refuses such prompts when added; a preempted request's recompute can still grow past it.
    scheduler = Scheduler(SchedulerConfig(8, 4, mix_prefill_and_decode=False, chunked_prefill=False),
                          BlockManager(16, 4))
    short, long = Request("short", list(range(6)), None, 0), Request("long", list(range(100, 109)), None, 1)
    scheduler.add_request(short)
    scheduler.add_request(long)
    first = scheduler.schedule()
    assert [s.request.request_id for s in first.scheduled] == ["short"]
    assert not first.failed  # it waits: a later step may have the room
    scheduler.update(first, {"short": [7]})
    second = scheduler.schedule()
    assert [r.request_id for r in second.failed] == ["long"] and long.finish_reason is FinishReason.ERROR
    assert [s.request.request_id for s in second.scheduled] == ["short"]  # then the decode step
    assert scheduler.blocks.num_free_blocks == 16 - 2
