"""A step's tokens grouped by LoRA slot, on the host (numpy, no torch): what `LoRABatch` is built from."""

from __future__ import annotations

import numpy as np


def group_by_slot(token_slots: np.ndarray, num_tokens: int) -> tuple[np.ndarray, tuple[tuple[int, int, int], ...]]:
    """One int64 array to send to the device, and the segments, for a step whose token `i` uses
    `token_slots[i]` (0: the base model).

    The array holds `num_tokens` slots (the step's tokens, then 0 for padding up to `num_tokens`)
    followed by the rows of adapter tokens grouped by slot, stably; segment ``(slot, start, end)``
    names the run ``[start, end)`` of those rows that uses `slot`.
    """
    order = np.argsort(token_slots, kind="stable")
    ordered = token_slots[order]
    first = int(np.searchsorted(ordered, 1))  # base-model rows come first: no segment
    slots, starts, counts = np.unique(ordered[first:], return_index=True, return_counts=True)
    segments = tuple((int(slot), int(start), int(start + count)) for slot, start, count in zip(slots, starts, counts))
    packed = np.zeros(num_tokens + len(order) - first, dtype=np.int64)
    packed[: len(token_slots)] = token_slots
    packed[num_tokens:] = order[first:]
    return packed, segments
