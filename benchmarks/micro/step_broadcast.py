"""Rank 0 to the other ranks, once a step: a torch.distributed (gloo) broadcast against a shared-memory ring.

A step's message is what `core/shard.py` sends: a few header ints, then per sequence its query length,
start, logit count and block-table length, then the tokens and the block tables, all int64. The cases
span a step the engine builds (1 to 2,048 tokens, 1 to 128 sequences, 32 blocks a sequence = 512
tokens of context at block size 16). The time is one way: from rank 0 starting to send to the worker
holding the tensor, both stamped with CLOCK_MONOTONIC; rank 0 waits for the worker's ack between
rounds so nothing is pipelined. The ring is a `multiprocessing.shared_memory` block, one slot, a
sequence counter the reader polls (spinning, then sleeping 50 µs once idle for 1 ms).

    python -m benchmarks.micro.step_broadcast

Measured on this machine (2 shared cores, torch 2.13 CPU), median / p90 µs one way:

    case                          bytes   gloo broadcast   shm ring
    decode, 1 seq                   328      446 / 3924       14 / 15
    decode, 128 seqs              37920      376 / 4009       18 / 18
    prefill, 2048 tokens, 1 seq   16704      455 / 3992       16 / 17
    mixed, 2048 tokens, 128 seqs  53280      335 / 3606       19 / 20

Kept: the ring, whenever every rank is on one machine (25x faster at the median, and gloo's tail of
~4 ms, the woken receiver waiting for a core, is a fifth of a CPU decode step); the gloo broadcast
only where ranks span machines (`core/step_broadcast.py`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import time
from datetime import timedelta
from multiprocessing import get_context, shared_memory

import numpy as np
import torch
import torch.distributed as dist

CASES = (("decode, 1 seq", 1, 1), ("decode, 128 seqs", 128, 128), ("prefill, 2048 tokens, 1 seq", 2048, 1),
         ("mixed, 2048 tokens, 128 seqs", 2048, 128))
BLOCKS_PER_SEQ = 32
HEADER = 4


def message(num_tokens: int, num_seqs: int) -> torch.Tensor:
    size = HEADER + 4 * num_seqs + num_tokens + BLOCKS_PER_SEQ * num_seqs
    return torch.arange(size, dtype=torch.int64)


class ShmRing:
    """One slot: [u64 sequence][u64 ack][u64 nbytes][payload]; the writer waits for the ack of the last."""

    def __init__(self, name: str | None, capacity: int):
        self.shm = shared_memory.SharedMemory(name=name, create=name is None, size=24 + capacity)
        self.buf = self.shm.buf
        self.seen = 0

    def _get(self, offset: int) -> int:
        return struct.unpack_from("<Q", self.buf, offset)[0]

    def send(self, payload: np.ndarray) -> None:
        data = payload.view(np.uint8)
        self.buf[24 : 24 + data.nbytes] = data
        struct.pack_into("<Q", self.buf, 16, data.nbytes)
        struct.pack_into("<Q", self.buf, 0, self._get(0) + 1)  # published last: the reader polls this

    def recv(self) -> torch.Tensor:
        idle_since = time.perf_counter()
        while self._get(0) == self.seen:
            if time.perf_counter() - idle_since > 1e-3:
                time.sleep(50e-6)
        self.seen += 1
        nbytes = self._get(16)
        return torch.frombuffer(bytearray(self.buf[24 : 24 + nbytes]), dtype=torch.int64)

    def ack(self) -> None:
        struct.pack_into("<Q", self.buf, 8, self._get(8) + 1)

    def wait_ack(self, count: int) -> None:
        while self._get(8) < count:
            time.sleep(20e-6)


def _worker(port: int, ring_name: str, rounds: int, stamps_name: str) -> None:
    dist.init_process_group("gloo", store=dist.TCPStore("127.0.0.1", port, 2, False), rank=1, world_size=2,
                            timeout=timedelta(seconds=60))
    ring = ShmRing(ring_name, 0)
    stamps = shared_memory.SharedMemory(name=stamps_name)
    out = np.ndarray((2, len(CASES), rounds), dtype=np.float64, buffer=stamps.buf)
    for c, (_, tokens, seqs) in enumerate(CASES):
        for r in range(rounds):
            header = torch.empty(HEADER, dtype=torch.int64)
            dist.broadcast(header, 0)
            payload = torch.empty(int(header[0]), dtype=torch.int64)
            dist.broadcast(payload, 0)
            out[0, c, r] = time.perf_counter()
            ring.ack()
        for r in range(rounds):
            ring.recv()
            out[1, c, r] = time.perf_counter()
            ring.ack()
    del out
    stamps.close()
    ring.shm.close()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    port = 29000 + os.getpid() % 1000
    largest = max(message(t, s).numel() for _, t, s in CASES) * 8
    ring = ShmRing(None, largest)
    stamps = shared_memory.SharedMemory(create=True, size=2 * len(CASES) * args.rounds * 8)
    worker = get_context("spawn").Process(target=_worker, args=(port, ring.shm.name, args.rounds, stamps.name))
    worker.start()
    dist.init_process_group("gloo", store=dist.TCPStore("127.0.0.1", port, 2, True), rank=0, world_size=2,
                            timeout=timedelta(seconds=60))
    sent = np.zeros((2, len(CASES), args.rounds))
    acks = 0
    for c, (_, tokens, seqs) in enumerate(CASES):
        msg = message(tokens, seqs)
        for r in range(args.rounds):
            sent[0, c, r] = time.perf_counter()
            dist.broadcast(torch.tensor([msg.numel(), tokens, seqs, 0]), 0)
            dist.broadcast(msg, 0)
            acks += 1
            ring.wait_ack(acks)
        for r in range(args.rounds):
            sent[1, c, r] = time.perf_counter()
            ring.send(msg.numpy())
            acks += 1
            ring.wait_ack(acks)
    worker.join()
    received = np.ndarray((2, len(CASES), args.rounds), dtype=np.float64, buffer=stamps.buf).copy()
    print(f"{'case':<30}{'bytes':>7}   gloo median/p90 µs   shm median/p90 µs")
    for c, (name, tokens, seqs) in enumerate(CASES):
        cells = []
        for way in range(2):
            lat = sorted((received[way, c, 10:] - sent[way, c, 10:]) * 1e6)  # the first rounds warm up
            cells.append(f"{statistics.median(lat):8.0f} / {lat[int(len(lat) * 0.9)]:6.0f}")
        print(f"{name:<30}{message(tokens, seqs).numel() * 8:>7}   {cells[0]:>18}   {cells[1]:>17}")
    stamps.close()
    stamps.unlink()
    ring.shm.close()
    ring.shm.unlink()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
