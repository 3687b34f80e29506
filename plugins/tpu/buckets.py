"""The step shapes the tpu backend compiles: powers of two up to the scheduler's limits.

Each (tokens, sequences) pair is an XLA graph compiled at warm-up (about 3 s each for a tiny model on
XLA's CPU device), so the ladders are short: tokens from 16, sequences from 1, doubling, the limit
itself always last so the scheduler's largest step has a shape.
"""

from __future__ import annotations

from tokenmill.interfaces import ShapeBuckets

MIN_TOKENS = 16


def ladder(start: int, limit: int) -> tuple[int, ...]:
    """`start`, doubling, below `limit`, then `limit`."""
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (limit,)


def shape_buckets(max_num_tokens: int, max_num_seqs: int) -> ShapeBuckets:
    return ShapeBuckets(num_tokens=ladder(min(MIN_TOKENS, max_num_tokens), max_num_tokens),
                        num_seqs=ladder(1, max_num_seqs))
