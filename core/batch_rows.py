"""How many leading rows of the batch being run are decode rows, for kernels that choose by row count.

A kernel whose arithmetic changes with the number of rows it gets (a CPU linear that runs a GGUF's own
blocks for a few rows and a dense copy from 32) would give a decode different numbers, and at a near tie
a different greedy token, whenever prompts share its step. Around the forward and around the logits the
model runner says how many leading rows are decodes (`AttentionMetadata.num_decode_tokens`); such a
kernel chooses by that count for those rows and runs the prompt rows apart, by a rule of their own. A
decode's result then depends on how many sequences decode together, never on the prompts beside them,
and a prompt row's not at all (`tokenmill.plugins.cpu.quant.PackedBF16Linear`).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class BatchRows:
    rows: int  # rows of every activation in the call (the step's tokens, or its logits rows)
    decodes: int  # the leading rows that are decodes


_CURRENT: ContextVar[BatchRows | None] = ContextVar("tokenmill_batch_rows", default=None)


@contextlib.contextmanager
def running(rows: int, decodes: int | None) -> Iterator[None]:
    """Calls within hold batches of `rows` rows whose first `decodes` are decodes (None: not known)."""
    token = _CURRENT.set(None if decodes is None else BatchRows(rows, decodes))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def decode_rows(rows: int) -> int | None:
    """How many of an activation's leading `rows` are decodes, if it is the batch being run and the
    step says; None otherwise (a layer's own subset of rows, a call outside a step)."""
    current = _CURRENT.get()
    if current is None or current.rows != rows:
        return None
    return current.decodes
