"""The padded step shapes a backend with shape buckets can be asked to run, one example step each.

Warm-up runs one step of every shape so that a compiling backend compiles before serving, not on a
user's request (`Engine.warmup`).
"""

from __future__ import annotations

import itertools
from typing import Iterable

from tokenmill.model_runner import SequenceStep, StepPadding, StepShape


def reachable_step_shapes(padding: StepPadding, block_size: int, max_tokens: int, max_seqs: int, longest: int,
                          num_blocks: int) -> dict[StepShape, list[SequenceStep]]:
    """A step of every padded shape the scheduler can make, keyed by that shape.

    `max_tokens` and `max_seqs` are the scheduler's per-step limits, `longest` the longest context a request
    can have, `num_blocks` the cache's blocks (the steps' block tables cycle through them).

    Decodes: a step of m sequences has m tokens, so m alone fixes its token and sequence buckets.
    Prefills: a step of n tokens over m sequences (n > m: one feeds two or more) has the shape of its
    (token, sequence) buckets; a pair is reachable when some n and m in it, within the scheduler's
    limits, have n > m. A prefill asking for more logit rows than its sequence bucket (prompt
    logprobs: n > that bucket) has a wider logits shape, warmed too.

    Widths: a step's widest block table spans from its evenly spread tokens (ceil(n / m) of a fresh
    prompt; for a decode, one) up to the longest context a request can have (the model's, or the
    cache's if smaller), so for each (tokens, sequences, logits) shape the fewest tokens and most
    sequences are tried, and every width bucket from that step's table up: the first sequence's
    tokens are placed at the end of a context of that width, the others start fresh prompts.

    The count is at most (D + 2 P) * W: D (token, sequence) pairs decodes reach (the sequence buckets
    up to max_num_seqs, when the smallest token bucket holds them), P pairs prefills reach (at most
    tokens x sequences buckets), W width buckets (1 without `ShapeBuckets.blocks_per_seq`).
    """
    buckets = padding.buckets
    shapes: dict[StepShape, list[SequenceStep]] = {}
    blocks = itertools.count()

    def widths_from(narrowest: int) -> Iterable[int]:
        """One table width (in blocks) per width bucket a step can reach, from `narrowest` blocks up."""
        floor = 0
        for bucket in padding.widths:
            width = max(floor + 1, narrowest)
            if width <= min(bucket, -(-longest // block_size)):
                yield width
            floor = bucket

    def add(lengths: list[int], logits: list[int], width: int) -> None:
        starts = [min(width * block_size, longest) - lengths[0]] + [0] * (len(lengths) - 1)
        steps = [SequenceStep([0] * n, start, [next(blocks) % num_blocks
                                               for _ in range(-(-(start + n) // block_size))], k)
                 for n, start, k in zip(lengths, starts, logits)]
        shape = padding.shape_of(sum(lengths), len(lengths), sum(logits), max(lengths) == 1,
                                 max(len(step.block_table) for step in steps))
        shapes.setdefault(shape, steps)

    for m in range(1, min(max_seqs, max_tokens) + 1):
        for width in widths_from(1):
            add([1] * m, [1] * m, width)
    token_floors = [0, *buckets.num_tokens[:-1]]
    seq_floors = [0, *buckets.num_seqs[:-1]]
    for token_floor, t in zip(token_floors, buckets.num_tokens):
        for seq_floor, s in zip(seq_floors, buckets.num_seqs):
            for wide_logits in (False, True):  # wide: every position's logits (prompt logprobs)
                n = max(token_floor + 1, seq_floor + 2, s + 1 if wide_logits else 0)
                m = min(s, max_seqs, n - 1)
                if n > min(t, max_tokens) or m <= seq_floor or n > m * longest:
                    continue
                lengths = [n // m + (i < n % m) for i in range(m)]
                for width in widths_from(-(-lengths[0] // block_size)):
                    add(lengths, lengths if wide_logits else [1] * m, width)
    return shapes
