"""`Engine.last_step`: what each step ran, as the batch metrics (TGI's `tgi_batch_*`) read it."""

from __future__ import annotations

import pytest

from tests.tiny_models import build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.sampling_params import SamplingParams

PARAMS = SamplingParams(max_new_tokens=4, ignore_eos=True)


@pytest.fixture()
def engine() -> Engine:
    config = EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=4 << 20, progress=False)
    return Engine(config, checkpoint=build_tiny("llama").checkpoint())


def test_each_step_says_whether_it_prefilled_and_who_joined_the_batch(engine) -> None:
    engine.add_request("a", [5, 6, 7], PARAMS)
    engine.step()
    first = engine.last_step
    assert (first.method, first.num_seqs, first.num_new_seqs, first.num_prefill_tokens) == ("prefill", 1, 1, 3)
    assert not first.joined_running and not first.failed
    engine.step()
    decode = engine.last_step
    assert (decode.method, decode.num_new_seqs, decode.num_decode_tokens) == ("decode", 0, 1)
    engine.add_request("b", [8, 9], PARAMS)
    engine.step()
    joined = engine.last_step
    assert (joined.method, joined.num_seqs, joined.num_new_seqs) == ("prefill", 2, 1)
    assert joined.joined_running  # TGI's batch concatenation
    assert joined.step == first.step + 2
    phases = (joined.schedule_s, joined.forward_s, joined.filter_s, joined.decode_s)
    assert min(phases) >= 0 and sum(phases) <= joined.total_s + 1e-9


def test_a_step_that_raises_is_recorded_as_failed(engine, monkeypatch) -> None:
    engine.add_request("a", [5, 6, 7], PARAMS)
    engine.step()

    def broken(steps):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "execute", broken)
    with pytest.raises(RuntimeError):
        engine.step()
    assert engine.last_step.failed and engine.last_step.method == "decode"
