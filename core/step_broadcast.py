"""Rank 0's message to the other ranks each step, and the two ways it travels.

A message is one int64 array: a header ``[kind, num_seqs, num_tokens, num_table_entries]``, then per
sequence its query length, start position, logit count, block-table length, LoRA adapter slot and RoPE
prefill length, then
every token and every block-table entry. `STEP` carries the scheduler's `SequenceStep`s, from which each rank builds
the very `StepInputs` rank 0 builds (`build_step_inputs` is deterministic); `STOP` ends the workers'
loop. Sending the steps rather than the built tensors keeps one builder of model inputs, and lets
rank 0 send before it builds, so every rank builds at the same time.

`ShmRing` serves ranks on one machine, `GlooChannel` any layout. `benchmarks/micro/step_broadcast.py`
measured a step's message one way at 14-19 µs median through the ring against 335-455 µs (p90 3.6-4 ms)
through a gloo broadcast, so the ring is used whenever every rank is on this machine.
"""

from __future__ import annotations

import abc
import threading
import time
from datetime import timedelta
from multiprocessing import resource_tracker, shared_memory
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from tokenmill.model_runner import SequenceStep

STEP, STOP = 1, 2
HEADER = 4
COLUMNS = 6  # ints per sequence


def encode_steps(steps: Sequence[SequenceStep]) -> np.ndarray:
    n = len(steps)
    query_lens = np.fromiter((len(s.token_ids) for s in steps), dtype=np.int64, count=n)
    table_lens = np.fromiter((len(s.block_table) for s in steps), dtype=np.int64, count=n)
    num_tokens, num_entries = int(query_lens.sum()), int(table_lens.sum())
    message = np.empty(HEADER + COLUMNS * n + num_tokens + num_entries, dtype=np.int64)
    message[:HEADER] = (STEP, n, num_tokens, num_entries)
    columns = message[HEADER : HEADER + COLUMNS * n].reshape(COLUMNS, n)
    columns[0] = query_lens
    columns[1] = np.fromiter((s.start_position for s in steps), dtype=np.int64, count=n)
    columns[2] = np.fromiter((s.num_logits for s in steps), dtype=np.int64, count=n)
    columns[3] = table_lens
    columns[4] = np.fromiter((s.adapter for s in steps), dtype=np.int64, count=n)
    columns[5] = np.fromiter((s.rope_prefill_length for s in steps), dtype=np.int64, count=n)
    body = HEADER + COLUMNS * n
    message[body : body + num_tokens] = np.fromiter((t for s in steps for t in s.token_ids), dtype=np.int64,
                                                    count=num_tokens)
    message[body + num_tokens :] = np.fromiter((b for s in steps for b in s.block_table), dtype=np.int64,
                                               count=num_entries)
    return message


def decode_steps(message: np.ndarray) -> list[SequenceStep]:
    n, num_tokens = int(message[1]), int(message[2])
    columns = message[HEADER : HEADER + COLUMNS * n].reshape(COLUMNS, n).tolist()
    query_lens, starts, num_logits, table_lens, adapters, prompt_lens = columns
    body = HEADER + COLUMNS * n
    tokens = message[body : body + num_tokens].tolist()
    tables = message[body + num_tokens :].tolist()
    steps, t, b = [], 0, 0
    for q, start, logits, length, adapter, prompt in zip(query_lens, starts, num_logits, table_lens, adapters,
                                                         prompt_lens):
        steps.append(SequenceStep(tokens[t : t + q], start, tables[b : b + length], logits, adapter, rope_prefill_length=prompt))
        t, b = t + q, b + length
    return steps


def stop_message() -> np.ndarray:
    return np.array([STOP, 0, 0, 0], dtype=np.int64)


def message_size(message_header: np.ndarray) -> int:
    """Ints in a message, from its header."""
    n, num_tokens, num_entries = (int(v) for v in message_header[1:HEADER])
    return HEADER + COLUMNS * n + num_tokens + num_entries


class StepChannel(abc.ABC):
    """Rank 0 sends; every other rank receives each message, in order."""

    @abc.abstractmethod
    def send(self, message: np.ndarray) -> None: ...

    @abc.abstractmethod
    def recv(self) -> np.ndarray: ...

    def close(self) -> None:
        """Release what this rank holds of the channel."""


class GlooChannel(StepChannel):
    """A broadcast over a gloo group of its own, for ranks on several machines.

    The group has no practical timeout: a worker waits here for as long as the server is idle. A dead
    peer closes its sockets, which fails the broadcast at once.
    """

    def __init__(self, rank: int):
        self.rank = rank
        self.group = dist.new_group(backend="gloo", timeout=timedelta(days=365))

    def send(self, message: np.ndarray) -> None:
        dist.broadcast(torch.from_numpy(message[:HEADER].copy()), 0, group=self.group)
        dist.broadcast(torch.from_numpy(message), 0, group=self.group)

    def recv(self) -> np.ndarray:
        header = torch.empty(HEADER, dtype=torch.int64)
        dist.broadcast(header, 0, group=self.group)
        message = torch.empty(message_size(header.numpy()), dtype=torch.int64)
        dist.broadcast(message, 0, group=self.group)
        return message.numpy()

    def close(self) -> None:
        self.group = None


class ShmRing(StepChannel):
    """One shared-memory slot that rank 0 writes and every other rank on this machine reads.

    Words: [0] the sequence number of the message in the slot, [1] its length in ints, [2 + r] how
    many messages reader r has copied out. Rank 0 writes the next message only once every reader has
    copied the last, then publishes its sequence number; readers poll that word.
    """

    def __init__(self, num_readers: int, capacity_ints: int, name: str | None = None, reader: int = 0,
                 alive: Callable[[], bool] | None = None, send_timeout_s: float = 30.0):
        self.num_readers = num_readers
        self.words = 2 + num_readers
        self.owner = name is None
        self.shm = shared_memory.SharedMemory(name=name, create=self.owner,
                                              size=8 * (self.words + (capacity_ints if self.owner else 0)))
        if not self.owner:
            # The creator unlinks the segment; without this, every reader's tracker would unlink it again.
            resource_tracker.unregister(self.shm._name, "shared_memory")  # noqa: SLF001 - CPython's own name
        self.capacity = self.shm.size // 8 - self.words
        self.view = np.ndarray(self.shm.size // 8, dtype=np.int64, buffer=self.shm.buf)
        self.reader = reader
        self.alive = alive
        self.send_timeout_s = send_timeout_s
        self.sent = 0
        self.seen = 0
        # A mutex acquire/release is a full memory barrier on every CPU: it orders the payload's
        # stores before the sequence number's (x86 does so anyway; ARM needs it).
        self._fence = threading.Lock()

    @property
    def name(self) -> str:
        return self.shm.name

    def send(self, message: np.ndarray) -> None:
        if message.size > self.capacity:
            raise RuntimeError(f"a step of {message.size} ints exceeds the ring's {self.capacity}")
        deadline = time.monotonic() + self.send_timeout_s
        acks = self.view[2 : self.words]
        while acks.min() < self.sent:
            if time.monotonic() > deadline:
                late = [r + 1 for r, a in enumerate(acks) if a < self.sent]
                raise TimeoutError(f"tensor-parallel ranks {late} did not take a step within {self.send_timeout_s} s")
            time.sleep(0)
        self.view[self.words : self.words + message.size] = message
        self.view[1] = message.size
        with self._fence:
            pass
        self.sent += 1
        self.view[0] = self.sent

    def recv(self) -> np.ndarray:
        idle_since = time.monotonic()
        checked = idle_since
        while self.view[0] == self.seen:
            # Spin (yielding the core) through the gap between two busy steps; back off once idle.
            now = time.monotonic()
            idle = now - idle_since
            time.sleep(0 if idle < 2e-3 else 50e-6 if idle < 0.1 else 1e-3)
            if self.alive is not None and now - checked > 1.0:
                checked = now
                if not self.alive():
                    raise RuntimeError("rank 0 is gone")
        with self._fence:
            pass
        message = self.view[self.words : self.words + int(self.view[1])].copy()
        self.seen += 1
        self.view[2 + self.reader] = self.seen
        return message

    def close(self) -> None:
        del self.view
        self.shm.close()
        if self.owner:
            self.shm.unlink()
