"""Following a compiled grammar token by token, and the step's bitmask over the whole batch."""

from __future__ import annotations

from typing import Any, Sequence

import torch


class GrammarMatcher:
    """One request's place in its grammar: advanced by every token it accepts.

    The grammar's stop tokens (the model's EOS) are allowed exactly where the grammar accepts the
    text so far; accepting one terminates the matcher, and the request with it.
    """

    def __init__(self, compiled: Any):
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(compiled)

    def accept(self, token_id: int) -> bool:
        """Advance by `token_id`; False if the grammar does not allow it (nothing changes then)."""
        return self._matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        return self._matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)


def fill_bitmask(matchers: Sequence[GrammarMatcher | None], vocab_size: int) -> torch.Tensor | None:
    """The step's allowed tokens as one (rows, ceil(vocab / 32)) int32 bitmask on the host, bit j of word w
    of a row allowing token 32 * w + j; rows without a grammar allow everything. None when no row has one.

    One C++ call per constrained row (xgrammar walks its precomputed token tables); nothing in Python
    touches the vocabulary.
    """
    if all(m is None for m in matchers):
        return None
    bitmask = torch.full((len(matchers), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        if matcher is not None and not matcher.terminated:
            matcher.fill(bitmask, row)
    return bitmask
