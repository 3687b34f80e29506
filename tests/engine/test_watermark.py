"""TGI's watermark: generation with it is detected by its z-score, generation without it is not; the
flags that set it reach every request."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.sampling_params import SamplingParams
from tokenmill.watermark import detect, green_mask

PROMPT = [5, 6, 7]


@pytest.fixture(scope="module")
def engine() -> Engine:
    tiny = build_tiny("llama")
    config = EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=4 << 20, progress=False)
    return Engine(config, checkpoint=tiny.checkpoint())


def _generate(engine: Engine, seed: int, **watermark) -> list[int]:
    params = SamplingParams(max_new_tokens=200, temperature=1.0, seed=seed, ignore_eos=True, **watermark)
    outputs = engine.generate([PROMPT], params)[0]
    return [t.id for out in outputs for t in out.new_tokens]


@pytest.mark.parametrize("seed", [1, 2])
def test_a_watermarked_generation_is_detected_and_a_plain_one_is_not(engine, seed) -> None:
    marked = _generate(engine, seed, watermark=True)
    plain = _generate(engine, seed)
    assert len(marked) == len(plain) == 200
    # The prompt's last token picks the first generated token's green list.
    marked_score, plain_score = detect(PROMPT[-1:] + marked), detect(PROMPT[-1:] + plain)
    assert marked_score.num_tokens == 200
    assert marked_score.detected() and marked_score.z_score > 4
    assert not plain_score.detected() and plain_score.z_score < 4


def test_the_gamma_and_delta_of_a_request_are_the_ones_used(engine) -> None:
    quarter = _generate(engine, 1, watermark=True, watermark_gamma=0.25, watermark_delta=2.0)
    assert detect(PROMPT[-1:] + quarter, gamma=0.25).z_score > 4
    # A watermark of strength 0 changes no logit: the same tokens as without one.
    assert _generate(engine, 1, watermark=True, watermark_delta=0.0) == _generate(engine, 1)


def test_the_green_list_holds_about_gamma_of_the_vocabulary() -> None:
    for gamma in (0.25, 0.5):
        mask = green_mask(torch.arange(64), torch.full((64, 1), gamma), 4096)
        assert abs(mask.float().mean().item() - gamma) < 0.01


def test_the_flags_and_their_variables_reach_the_server_settings(monkeypatch) -> None:
    from tokenmill.api.server import ServeOptions, make_settings
    from tokenmill.cli import build_parser

    monkeypatch.setenv("WATERMARK_DELTA", "1.25")
    args = build_parser().parse_args(["serve", "--watermark-gamma", "0.3"])
    assert (args.watermark_gamma, args.watermark_delta) == (0.3, 1.25)
    options = ServeOptions(engine=EngineConfig(), watermark_gamma=args.watermark_gamma,
                           watermark_delta=args.watermark_delta)
    settings = make_settings(options, "m", 64, "cpu")
    assert (settings.watermark_gamma, settings.watermark_delta) == (0.3, 1.25)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--watermark-gamma", "1.5"])
