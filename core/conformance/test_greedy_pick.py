"""The backend's greedy pick (`tokenmill_greedy_pick`) chooses the PyTorch reference's tokens, with its
log-probabilities to float32 rounding."""

from __future__ import annotations

import pytest
import torch

from tokenmill.interfaces import GreedyPick

pytestmark = pytest.mark.kernel  # runs under `tokenmill conformance --interpret` too

REFERENCE = GreedyPick()


def _logits(rows: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rows * vocab)
    logits = (torch.randn(rows, vocab, generator=generator) * 4).to(torch.bfloat16).float()  # bf16 logits tie
    if rows > 3:
        logits[1, [5, vocab - 1]] = logits[1].max() + 1.0  # a tie at the top: the first one is chosen
        logits[2] = float("-inf")
        logits[2, 7] = 0.0  # one finite logit: probability 1
        logits[3, :vocab // 2] = float("-inf")  # a grammar's mask over half the vocabulary
    return logits


@pytest.mark.parametrize("rows, vocab", [(1, 256), (16, 49152), (5, 32001)])
def test_greedy_pick_matches_the_reference(backend, device, rows, vocab) -> None:
    logits = _logits(rows, vocab)
    tokens, logprobs = REFERENCE.pick(logits, logprobs=True)
    got_tokens, got_logprobs = backend.greedy_pick().pick(logits.clone().to(device), logprobs=True)
    assert torch.equal(got_tokens.cpu(), tokens)
    torch.testing.assert_close(got_logprobs.cpu(), logprobs, rtol=1e-5, atol=1e-6)
    got_tokens, none = backend.greedy_pick().pick(logits.to(device), logprobs=False)
    assert torch.equal(got_tokens.cpu(), tokens) and none is None


def test_rows_without_a_distribution_get_the_reference_token_and_nan(backend, device) -> None:
    logits = torch.zeros(3, 64)
    logits[0] = float("-inf")  # everything masked
    logits[1, 9] = float("nan")
    logits[2, 3] = float("inf")
    tokens, logprobs = REFERENCE.pick(logits, logprobs=True)
    got_tokens, got_logprobs = backend.greedy_pick().pick(logits.to(device), logprobs=True)
    assert torch.equal(got_tokens.cpu(), tokens)
    torch.testing.assert_close(got_logprobs.cpu(), logprobs, equal_nan=True)
