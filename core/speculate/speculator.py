"""Who gets a draft, how long, and the counters of what verification kept."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable

from tokenmill.request import Request
from tokenmill.speculate.ngram import MAX_NGRAM, MIN_NGRAM, propose_ngram
from tokenmill.speculate.verify import Verification


@dataclass
class SpeculationStats:
    """Counters since the engine started: vLLM's `spec_decode_*` and the decode tokens per forward."""

    num_drafts: int = 0  # sequence-steps that verified a draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: drafts whose token k was kept
    num_decode_forwards: int = 0  # sequence-steps past the prompt, draft or not: one forward each
    num_decode_tokens: int = 0  # the tokens those steps produced

    @property
    def tokens_per_forward(self) -> float:
        """Tokens a decoding sequence gets from one forward: 1 without speculation."""
        return self.num_decode_tokens / self.num_decode_forwards if self.num_decode_forwards else 0.0

    def __add__(self, other: "SpeculationStats") -> "SpeculationStats":
        """Two engines' counters together (the replicas behind one router)."""
        per_position = [0] * max(len(self.accepted_per_position), len(other.accepted_per_position))
        for counts in (self.accepted_per_position, other.accepted_per_position):
            for k, n in enumerate(counts):
                per_position[k] += n
        return SpeculationStats(
            self.num_drafts + other.num_drafts, self.num_draft_tokens + other.num_draft_tokens,
            self.num_accepted_tokens + other.num_accepted_tokens, per_position,
            self.num_decode_forwards + other.num_decode_forwards, self.num_decode_tokens + other.num_decode_tokens)

    def copy(self) -> "SpeculationStats":
        return dataclasses.replace(self, accepted_per_position=list(self.accepted_per_position))

    def record(self, verification: Verification, kept: list[list[int]]) -> None:
        for request, decoding, tokens in zip(verification.requests, verification.decoding, kept):
            if decoding:
                self.num_decode_forwards += 1
                self.num_decode_tokens += len(tokens)
            draft = len(request.draft_token_ids)
            if not draft:
                continue
            self.num_drafts += 1
            self.num_draft_tokens += draft
            self.num_accepted_tokens += len(tokens) - 1
            self.accepted_per_position += [0] * (draft - len(self.accepted_per_position))
            for k in range(len(tokens) - 1):
                self.accepted_per_position[k] += 1


class NgramSpeculator:
    """Drafts of up to `num_draft` tokens by prompt lookup (`propose_ngram`), for every decoding sequence
    that can take them."""

    def __init__(self, num_draft: int, max_model_len: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        self.num_draft = num_draft
        self.max_model_len = max_model_len
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, requests: Iterable[Request]) -> None:
        for request in requests:
            request.draft_token_ids = propose_ngram(request.token_ids, self.room(request), self.max_ngram,
                                                    self.min_ngram)

    def room(self, request: Request) -> int:
        """How many draft tokens `request` can verify next step: none mid-prompt or under a grammar (the
        matcher cannot be asked about a guess), and never so many that the step could pass
        `max_new_tokens` or the model's length, which the step's last token may reach."""
        params = request.sampling_params
        if request.num_tokens - request.num_computed_tokens != 1 or params.grammar is not None:
            return 0
        left = min(params.max_new_tokens - request.num_output_tokens, self.max_model_len - request.num_tokens)
        return max(0, min(self.num_draft, left - 1))
