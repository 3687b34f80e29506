"""TGI's `watermark`: Kirchenbauer et al.'s green-list watermark ("A Watermark for Large Language
Models", 2023), as a batched logits step, and its detector.

The scheme: before each token is chosen, the previous token picks a pseudo-random "green" share
`gamma` of the vocabulary, and every green token's logit gains `delta`. Text written that way holds
far more green tokens than chance; anyone who knows the rule counts them and computes a z-score,
without the model. TGI's defaults are gamma 0.5 and delta 2.0 (`--watermark-gamma`, `--watermark-delta`).

TGI seeds a generator with `15485863 * previous token` and takes the first `gamma` of a random
permutation of the vocabulary, one request at a time. Here the green list is a hash of (previous
token, token id) against `gamma`, so a whole batch is marked in a few elementwise tensor ops with no
per-request work, and the detector needs nothing but the token ids. Each (previous token, token) pair
is green with probability `gamma`, independently of the text, which is all the z-test assumes. The
lists are not TGI's (a per-request randperm has no batched equivalent), so text TGI watermarked is
scored by TGI's rule, not this one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from tokenmill.model_runner import host_to_device

HASH_KEY = 15485863  # TGI's: a large prime, so neighbouring previous tokens seed unrelated lists
_MASK32 = 0xFFFFFFFF


def mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser on 32-bit values held in int64 (products wrap; the low bits are exact)."""
    h = h & _MASK32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _uniform(previous: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """A uniform in [0, 1) for each (previous token, token) pair, broadcasting the two."""
    h = mix32(mix32(previous * HASH_KEY) ^ mix32(token + 0x27D4EB2F))
    return h.float() / 2**32


def green_mask(previous: torch.Tensor, gamma: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, vocab) bool: the green list of each row, from its previous token (B,) and its gamma (B, 1)."""
    tokens = torch.arange(vocab_size, dtype=torch.int64, device=previous.device)
    return _uniform(previous[:, None], tokens[None, :]) < gamma


@dataclass
class WatermarkBatch:
    """The watermark settings of a step's rows as tensors; rows without a watermark have gamma 0."""

    previous: torch.Tensor  # (B,) int64: the token before the one being drawn
    gamma: torch.Tensor  # (B, 1)
    delta: torch.Tensor  # (B, 1)

    @classmethod
    def build(cls, params: Sequence, token_ids: Sequence[Sequence[int]], device: torch.device
              ) -> "WatermarkBatch | None":
        """None when no row asks for a watermark (the step then skips it entirely)."""
        if not any(p.watermark for p in params):
            return None

        def column(values):
            return host_to_device(torch.tensor(values, dtype=torch.float32), device).view(-1, 1)

        return cls(
            previous=host_to_device(torch.tensor([t[-1] for t in token_ids], dtype=torch.int64), device),
            gamma=column([p.watermark_gamma if p.watermark else 0.0 for p in params]),
            delta=column([p.watermark_delta if p.watermark else 0.0 for p in params]),
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`delta` added to the green logits of the watermarked rows; the other rows come back unchanged."""
        green = green_mask(self.previous, self.gamma, logits.shape[-1])
        return torch.where(green, logits + self.delta, logits)


@dataclass(frozen=True)
class WatermarkScore:
    num_tokens: int  # tokens scored: all but the first, which only seeds the next one's list
    num_green: int
    z_score: float

    def detected(self, threshold: float = 4.0) -> bool:
        """Kirchenbauer et al.'s test: at z = 4 one unwatermarked text in about 30,000 is flagged."""
        return self.z_score > threshold


def detect(token_ids: Sequence[int], gamma: float = 0.5) -> WatermarkScore:
    """Score a token sequence: how many tokens are on the green list their predecessor picks, against
    the `gamma` share expected of text written without the watermark. Put the prompt's last token
    first to score every generated token."""
    if len(token_ids) < 2:
        return WatermarkScore(0, 0, 0.0)
    ids = torch.tensor(list(token_ids), dtype=torch.int64)
    green = int((_uniform(ids[:-1], ids[1:]) < gamma).sum())
    n = len(token_ids) - 1
    return WatermarkScore(n, green, (green - gamma * n) / math.sqrt(n * gamma * (1 - gamma)))
