"""Grammar masks on the CPU: csrc/token_mask.c sets the disallowed logits to -inf in place, skipping every
fully-allowed 32-token word with one compare. Falls back to the reference (`TokenMask`) where the
extension was not built, or for logits that are not float32.
"""

from __future__ import annotations

import torch

from tokenmill.interfaces import TokenMask

try:
    from tokenmill.plugins.cpu import _token_mask
except ImportError:  # pragma: no cover - depends on the build
    _token_mask = None


class CTokenMask(TokenMask):
    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        if (_token_mask is None or logits.dtype != torch.float32 or logits.stride(1) != 1
                or bitmask.dtype != torch.int32 or bitmask.stride(1) != 1):
            return super().apply(logits, bitmask)
        _token_mask.apply(logits.data_ptr(), logits.stride(0), bitmask.data_ptr(), bitmask.stride(0),
                          logits.shape[0], logits.shape[1], torch.get_num_threads())
        return logits
