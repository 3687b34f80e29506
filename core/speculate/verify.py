"""Verifying drafts: every fed position sampled as plain decoding would have sampled it, one call.

A request with a draft of n tokens gets n + 1 sampling rows: row r is the token after its tokens and
the first r draft tokens, sampled with the history it would have if those r were accepted (penalties,
`min_tokens`, the watermark and a seeded draw's step counter all follow it). Draft token r is kept iff
row r sampled exactly it; the first row that disagrees, or the row after the whole draft, gives the
step's last token. So every kept token is the token plain decoding would have sampled at its place:

* greedy requests get plain decoding's output, token for token (up to the float rounding of a
  several-token query against a one-token one: none where the backend computes each fed token as a
  one-token decode at its position);
* seeded requests too: a seeded draw depends on (seed, position, token) alone (`tokenmill.sampler`);
* unseeded requests draw from the engine's generator, which then serves more rows than plain
  decoding would: the text differs from a run without speculation, its distribution does not. With a
  draft that is one token (n-gram lookup), "keep iff sampled" is exact rejection sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from tokenmill.request import Request


@dataclass
class Verification:
    """A step's sampling requests and their rows; `starts[i]` is request i's first row, `starts[-1]` the count."""

    requests: Sequence[Request]
    starts: list[int] = field(default_factory=list)
    decoding: list[bool] = field(default_factory=list)  # past its prompt before this step: a decode forward

    def __post_init__(self) -> None:
        self.starts = [0]
        for request in self.requests:
            self.starts.append(self.starts[-1] + len(request.draft_token_ids) + 1)
        self.decoding = [r.num_computed_tokens >= r.num_prompt_tokens for r in self.requests]

    @property
    def num_rows(self) -> int:
        return self.starts[-1]

    def row_requests(self) -> list[Request]:
        """The request of each row."""
        return [r for r in self.requests for _ in range(len(r.draft_token_ids) + 1)]

    def histories(self) -> list[Sequence[int]]:
        """Each row's tokens so far: the request's, then the draft tokens the row assumes accepted."""
        return [r.token_ids + r.draft_token_ids[:k] if k else r.token_ids
                for r in self.requests for k in range(len(r.draft_token_ids) + 1)]

    def kept(self, sampled: Sequence[int]) -> list[list[int]]:
        """Per request, the tokens it keeps from the rows' samples: the accepted draft tokens and the
        token after them (the rows `starts[i]` on, as many as it keeps)."""
        kept = []
        for request, start in zip(self.requests, self.starts):
            tokens = [sampled[start]]
            for k, guess in enumerate(request.draft_token_ids):
                if tokens[-1] != guess:
                    break
                tokens.append(sampled[start + k + 1])
            kept.append(tokens)
        return kept
