"""The vectorised sampler against transformers' logits processors, row by row."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from tokenmill.errors import ValidationError
from tokenmill.sampler import Sampler, SamplingMetadata
from tokenmill.sampling_params import SamplingParams

VOCAB = 64


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _meta(params, histories=None):
    histories = histories or [[1, 2]] * len(params)
    return SamplingMetadata.build(params, histories, [1] * len(params), VOCAB, torch.device("cpu"))


def _kept(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits)


@pytest.mark.parametrize("name, params, reference", [
    ("top_k", dict(top_k=5), TopKLogitsWarper(5)),
    ("top_p", dict(top_p=0.7), TopPLogitsWarper(0.7)),
    ("typical_p", dict(typical_p=0.6), TypicalLogitsWarper(0.6)),
    ("min_p", dict(min_p=0.1), MinPLogitsWarper(0.1)),
])
def test_each_warper_keeps_the_same_tokens_as_transformers(name, params, reference) -> None:
    logits = _logits(6, seed=len(name))
    batch = [SamplingParams(temperature=1.0, **params)] * 6
    ours = Sampler._warp(logits.clone(), _meta(batch))
    theirs = reference(torch.zeros(6, 1, dtype=torch.long), logits.clone())
    assert torch.equal(_kept(ours), _kept(theirs))


def test_mixed_rows_each_get_their_own_settings() -> None:
    logits = _logits(3, seed=9)
    batch = [SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0),
             SamplingParams(temperature=1.0, top_p=0.5)]
    ours = Sampler._warp(logits.clone(), _meta(batch))
    assert _kept(ours[0]).sum() == 3
    assert _kept(ours[1]).all()
    expected = TopPLogitsWarper(0.5)(torch.zeros(1, 1, dtype=torch.long), logits[2:3].clone())
    assert torch.equal(_kept(ours[2:3]), _kept(expected))


def test_repetition_penalty_matches_transformers() -> None:
    logits = _logits(2, seed=3)
    history = [[5, 9, 9, 40], [0, 1]]
    meta = SamplingMetadata.build([SamplingParams(repetition_penalty=1.3)] * 2, history, [2, 2], VOCAB,
                                  torch.device("cpu"))
    ours = Sampler._apply_penalties(logits.clone(), meta)
    for row in range(2):
        expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history[row]]), logits[row:row + 1].clone())
        assert torch.allclose(ours[row], expected[0])


def test_frequency_and_presence_penalties_count_only_generated_tokens() -> None:
    logits = torch.zeros(1, VOCAB)
    meta = SamplingMetadata.build([SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)],
                                  [[7, 7, 3, 3, 3]], [2], VOCAB, torch.device("cpu"))  # prompt [7, 7]
    out = Sampler._apply_penalties(logits, meta)[0]
    assert out[3].item() == pytest.approx(-(3 * 0.5 + 0.25))
    assert out[7].item() == 0.0


def test_temperature_scales_like_transformers() -> None:
    logits = _logits(1)
    meta = _meta([SamplingParams(temperature=0.5)])
    expected = TemperatureLogitsWarper(0.5)(torch.zeros(1, 1, dtype=torch.long), logits.clone())
    assert torch.allclose(logits / meta.temperature, expected)


def test_greedy_is_argmax_and_reports_logprobs() -> None:
    logits = _logits(4)
    out = Sampler()(logits, _meta([SamplingParams(logprobs=True, top_n_tokens=3)] * 4))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    expected = torch.log_softmax(logits, -1).max(-1).values
    assert torch.allclose(out.logprobs, expected)
    assert torch.equal(out.top_token_ids[:, 0], out.token_ids)


def test_seeded_draws_do_not_depend_on_the_batch() -> None:
    logits = _logits(5, seed=11)
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = Sampler(seed=1)(logits[2:3], _meta([seeded])).token_ids
    batch = [SamplingParams(temperature=1.0)] * 2 + [seeded] + [SamplingParams(temperature=0.7, seed=7)] * 2
    together = Sampler(seed=99)(logits, _meta(batch)).token_ids
    assert together[2] == alone[0]


def test_samples_follow_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (VOCAB - 4)])
    sampler = Sampler(seed=0)
    meta = _meta([SamplingParams(temperature=1.0)])
    counts = torch.zeros(VOCAB)
    for _ in range(4000):
        counts[sampler(logits, meta).token_ids[0]] += 1
    expected = torch.softmax(logits[0], -1) * 4000
    chi2 = ((counts[:4] - expected[:4]) ** 2 / expected[:4]).sum().item()
    assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001


def test_seeded_samples_follow_the_distribution_too() -> None:
    logits = torch.tensor([[1.0, 0.5, 0.0] + [-30.0] * (VOCAB - 3)])
    counts = torch.zeros(3)
    for seed in range(3000):
        meta = _meta([SamplingParams(temperature=1.0, seed=seed)])
        counts[Sampler()(logits, meta).token_ids[0]] += 1
    expected = torch.softmax(logits[0], -1)[:3] * 3000
    assert ((counts - expected) ** 2 / expected).sum().item() < 13.8  # 2 degrees of freedom, p = 0.001


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=0),
                                 dict(repetition_penalty=0.0), dict(frequency_penalty=3.0), dict(typical_p=1.5)])
def test_invalid_parameters_are_rejected_with_a_message(bad) -> None:
    with pytest.raises(ValidationError, match="`"):
        SamplingParams(**bad)


def test_seeds_differing_only_in_high_bits_draw_differently() -> None:
    logits = torch.zeros(1, VOCAB)
    draws = set()
    for high in range(8):
        meta = _meta([SamplingParams(temperature=1.0, seed=(high << 40) | 7)])
        draws.add(Sampler()(logits, meta).token_ids.item())
    assert len(draws) > 1


def test_rows_with_filters_off_keep_every_token_beside_rows_with_them_on() -> None:
    logits = _logits(2, seed=4)
    batch = [SamplingParams(temperature=1.0, top_p=0.3, typical_p=0.5), SamplingParams(temperature=1.0)]
    warped = Sampler._warp(logits.clone(), _meta(batch))
    assert torch.isfinite(warped[1]).all()


def test_a_top_k_past_the_vocabulary_keeps_every_token() -> None:
    from tokenmill.sampler import Sampler, SamplingMetadata
    from tokenmill.sampling_params import SamplingParams

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(max_new_tokens=1, temperature=1.0, top_k=10**9, seed=1),
              SamplingParams(max_new_tokens=1, temperature=1.0, seed=1)]
    meta = SamplingMetadata.build(params, [[1], [1]], [1, 1], 50, torch.device("cpu"))
    out = Sampler(seed=0)(torch.cat([logits[:1], logits[:1]]), meta)
    assert out.token_ids[0] == out.token_ids[1]  # same seed, same distribution: top_k changed nothing
