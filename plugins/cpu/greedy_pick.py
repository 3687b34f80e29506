"""Greedy tokens on the CPU: csrc/greedy_pick.c finds each row's token and its log-probability in one pass.
Falls back to the reference (`GreedyPick`) where the extension was not built, or for logits that are not
contiguous float32 rows.
"""

from __future__ import annotations

import torch

from tokenmill.interfaces import GreedyPick

try:
    from tokenmill.plugins.cpu import _greedy_pick
except ImportError:  # pragma: no cover - depends on the build
    _greedy_pick = None


class CGreedyPick(GreedyPick):
    def pick(self, logits: torch.Tensor, logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if _greedy_pick is None or logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
            return super().pick(logits, logprobs)
        rows, vocab = logits.shape
        tokens = torch.empty(rows, dtype=torch.int64)
        chosen = torch.empty(rows, dtype=torch.float32)
        _greedy_pick.pick(logits.data_ptr(), logits.stride(0), tokens.data_ptr(), chosen.data_ptr(), rows, vocab,
                          torch.get_num_threads())
        return tokens, chosen if logprobs else None
