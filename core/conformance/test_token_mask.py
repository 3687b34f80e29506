"""The backend's grammar mask (`tokenmill_token_mask`) gives exactly the PyTorch reference's logits."""

from __future__ import annotations

import pytest
import torch

from tokenmill.interfaces import TokenMask

pytestmark = pytest.mark.kernel  # runs under `tokenmill conformance --interpret` too

REFERENCE = TokenMask()


@pytest.mark.parametrize("rows, vocab", [(1, 256), (16, 49152), (5, 32001)])
def test_token_mask_matches_the_reference(backend, device, rows, vocab) -> None:
    generator = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=generator)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, words), dtype=torch.int32, generator=generator)
    if rows > 2:
        bitmask[1] = -1  # a row without a grammar
        bitmask[2] = bitmask[2] * (torch.rand(words, generator=generator) < 0.02).int()  # a few allowed
    expected = REFERENCE.apply(logits, bitmask)
    got = backend.token_mask().apply(logits.clone().to(device), bitmask.to(device))
    assert torch.equal(got.cpu(), expected)
