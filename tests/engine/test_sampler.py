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


# ---- logit_bias, min_tokens, the watermark -----------------------------------------------------------


def test_a_logit_bias_of_minus_100_keeps_the_greedy_token_out() -> None:
    logits = _logits(3, seed=21)
    best = logits.argmax(-1)
    banned = [SamplingParams(logit_bias=((int(best[0]), -100.0),)), SamplingParams(),
              SamplingParams(logit_bias=((int(best[2]), -100.0), (int(best[2]) ^ 1, 3.0)))]
    out = Sampler()(logits, _meta(banned)).token_ids
    assert out[0] != best[0] and out[2] != best[2]
    assert out[1] == best[1]  # a row without a bias is untouched


def test_a_positive_logit_bias_adds_to_that_token_only() -> None:
    logits = _logits(2, seed=22)
    meta = _meta([SamplingParams(logit_bias=((7, 2.5),)), SamplingParams()])
    biased = Sampler._apply_biases(logits.clone(), meta)
    expected = logits.clone()
    expected[0, 7] += 2.5
    assert torch.equal(biased, expected)


def test_min_tokens_masks_eos_and_stop_tokens_until_enough_are_out() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 1], logits[0, 9], logits[0, 4] = 10.0, 9.0, 8.0  # EOS 1, then stop token 9, then token 4
    params = SamplingParams(min_tokens=3, stop_token_ids=(9,))
    for generated, expected in ((0, 4), (2, 4), (3, 1)):
        meta = SamplingMetadata.build([params], [[5, 6] + [4] * generated], [2], VOCAB, torch.device("cpu"),
                                      eos_token_ids={1})
        assert Sampler()(logits, meta).token_ids.item() == expected


def test_top_k_1_sampling_is_greedy() -> None:
    logits = _logits(8, seed=23)
    sampled = Sampler(seed=3)(logits, _meta([SamplingParams(temperature=1.5, top_k=1, seed=s) for s in range(8)]))
    unfiltered = Sampler(seed=3)(logits, _meta([SamplingParams(temperature=1.5, seed=s) for s in range(8)]))
    assert torch.equal(sampled.token_ids, logits.argmax(-1))
    assert not torch.equal(unfiltered.token_ids, logits.argmax(-1))  # without top_k these rows sample elsewhere


def test_the_watermark_adds_delta_to_the_green_list_of_its_rows_only() -> None:
    from tokenmill.watermark import green_mask

    logits = _logits(2, seed=24)
    params = [SamplingParams(watermark=True, watermark_gamma=0.25, watermark_delta=1.5), SamplingParams()]
    histories = [[3, 17], [3, 17]]
    marked = Sampler._apply_biases(logits.clone(), _meta(params, histories))
    green = green_mask(torch.tensor([17]), torch.tensor([[0.25]]), VOCAB)[0]
    assert torch.equal(marked[1], logits[1])
    assert torch.allclose(marked[0][green], logits[0][green] + 1.5)
    assert torch.equal(marked[0][~green], logits[0][~green])
    assert 0 < green.sum() < VOCAB


def test_the_new_processors_never_sync() -> None:
    from tokenmill.sync_audit import SyncAudit

    meta_device = torch.device("meta")
    params = [SamplingParams(logit_bias=((3, -100.0),), min_tokens=4, stop_token_ids=(7,)),
              SamplingParams(temperature=0.8, watermark=True, seed=1), SamplingParams()]
    with SyncAudit() as audit:
        meta = SamplingMetadata.build(params, [[1, 2], [5], [6, 6]], [1, 1, 1], VOCAB, meta_device,
                                      eos_token_ids={1})
        Sampler()(torch.randn(3, VOCAB, device=meta_device), meta)
    assert not audit.syncs, audit.report()


def _bitmask(rows: list[set[int] | None], vocab: int) -> torch.Tensor:
    """xgrammar's layout: bit j of word w allows token 32 * w + j; None: every token."""
    words = torch.zeros(len(rows), (vocab + 31) // 32, dtype=torch.int64)
    for r, allowed in enumerate(rows):
        for token in (range(vocab) if allowed is None else allowed):
            words[r, token // 32] |= 1 << (token % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("sampled", [False, True])
def test_the_grammar_mask_restricts_constrained_rows_and_leaves_the_others_alone(sampled) -> None:
    vocab, allowed = VOCAB, {3, 40, 61}
    logits = _logits(4, seed=5)
    settings = dict(temperature=1.5, seed=9) if sampled else {}
    params = [SamplingParams(**settings), SamplingParams(**settings, logprobs=True)] * 2
    meta = SamplingMetadata.build(params, [[1]] * 4, [1] * 4, vocab, torch.device("cpu"),
                                  token_bitmask=_bitmask([allowed, None, allowed, None], vocab))
    plain = SamplingMetadata.build(params, [[1]] * 4, [1] * 4, vocab, torch.device("cpu"))
    masked, free = Sampler(seed=0)(logits, meta), Sampler(seed=0)(logits, plain)
    assert set(masked.token_ids[[0, 2]].tolist()) <= allowed
    assert masked.token_ids[[1, 3]].tolist() == free.token_ids[[1, 3]].tolist()
    assert torch.equal(masked.logprobs[[1, 3]], free.logprobs[[1, 3]])
    if not sampled:
        assert masked.token_ids[0] == max(allowed, key=lambda t: logits[0, t])
