"""Gaudi's shape buckets: ramps of token counts, sequence counts and block-table widths.

Gaudi's graph compiler builds one recipe per input shape and an HPU graph replays one shape, so every
step is padded to a bucket (`tokenmill.interfaces.ShapeBuckets`) and warm-up compiles each reachable
one. Each dimension is a ramp, as Gaudi's vLLM and TGI forks build theirs: from MIN doubling while below
STEP, then every STEP up to MAX, MAX always included. Doubling keeps small batches cheap to pad; the
linear part bounds the padding of large ones to STEP.

Each ramp can be set as ``MIN:STEP:MAX`` in an environment variable (an empty field keeps the default):

* ``TOKENMILL_GAUDI_TOKEN_BUCKETS``: tokens per step; MAX is capped at the scheduler's token budget, and
  a smaller MAX lowers that budget.
* ``TOKENMILL_GAUDI_SEQ_BUCKETS``: sequences per step; the same with the scheduler's sequence limit.
* ``TOKENMILL_GAUDI_BLOCK_BUCKETS``: block-table widths in blocks of `attention.DEFAULT_BLOCK_SIZE`
  tokens; the core clamps them to the model's context, which MAX must reach (the default's does).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Mapping

from tokenmill.interfaces import ShapeBuckets

TOKENS_ENV = "TOKENMILL_GAUDI_TOKEN_BUCKETS"
SEQS_ENV = "TOKENMILL_GAUDI_SEQ_BUCKETS"
BLOCKS_ENV = "TOKENMILL_GAUDI_BLOCK_BUCKETS"

# Defaults: a step of up to 128 tokens pads to 128 token rows (a weight-bound matmul on Gaudi's matrix
# engine costs about the same for 1 row as for 128); tokens double to 512, then step by 512 up to the
# budget; sequences double to 32, then step by 32 (vLLM-Gaudi's decode batch step); widths only double
# (attention pays at most twice the context it needs, and a 32k-token context has 9 widths, not 256 /
# STEP), up to a MAX past any model's context (8,192 blocks of 128 tokens: 1M), which the core clamps.
DEFAULT_MIN_TOKENS, DEFAULT_TOKEN_STEP = 128, 512
DEFAULT_SEQ_STEP = 32
DEFAULT_MAX_BLOCKS = 8192
DEFAULT_BLOCK_STEP = DEFAULT_MAX_BLOCKS


@dataclass(frozen=True)
class Ramp:
    """Sizes from `minimum` doubling while below `step`, then every `step` up to `maximum`, which is always one."""

    minimum: int
    step: int
    maximum: int

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum or self.step < 1:
            raise ValueError(f"a bucket ramp needs 1 <= MIN <= MAX and STEP >= 1; got MIN {self.minimum}, "
                             f"STEP {self.step}, MAX {self.maximum}")

    def sizes(self) -> tuple[int, ...]:
        end = min(self.step, self.maximum + 1)
        doubling = itertools.takewhile(lambda size: size < end, (self.minimum << i for i in itertools.count()))
        linear = range(self.step, self.maximum + 1, self.step)
        return tuple(sorted({size for size in (*doubling, *linear, self.maximum) if size >= self.minimum}))


def parse_ramp(text: str, default: Ramp, variable: str) -> Ramp:
    """The ramp ``MIN:STEP:MAX`` in `text` (from environment variable `variable`); empty fields keep `default`'s."""
    usage = (f"{variable}={text!r}: expected MIN:STEP:MAX, positive integers (an empty field keeps the default), "
             "e.g. 1:32:128")
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(usage)
    defaults = (default.minimum, default.step, default.maximum)
    try:
        values = [int(part) if part.strip() else fallback for part, fallback in zip(parts, defaults)]
    except ValueError:
        raise ValueError(usage) from None
    try:
        return Ramp(*values)
    except ValueError as error:
        raise ValueError(f"{variable}={text!r}: {error}") from None


def _ramp(environ: Mapping[str, str], variable: str, default: Ramp, limit: int | None = None,
          limit_name: str = "") -> Ramp:
    """`variable`'s ramp from `environ` (else `default`), its MAX capped at the scheduler's `limit`."""
    ramp = parse_ramp(environ[variable], default, variable) if environ.get(variable) else default
    if limit is None:
        return ramp
    if ramp.minimum > limit:
        raise ValueError(f"{variable}: MIN {ramp.minimum} is above the scheduler's {limit_name} ({limit})")
    return replace(ramp, maximum=min(ramp.maximum, limit))


def shape_buckets(max_num_tokens: int, max_num_seqs: int, environ: Mapping[str, str]) -> ShapeBuckets:
    """Token, sequence and width buckets up to the scheduler's limits, from `environ`'s ramps or the defaults."""
    default_tokens = Ramp(min(DEFAULT_MIN_TOKENS, max_num_tokens), DEFAULT_TOKEN_STEP, max_num_tokens)
    tokens = _ramp(environ, TOKENS_ENV, default_tokens, max_num_tokens, "token budget (--max-batch-prefill-tokens)")
    seqs = _ramp(environ, SEQS_ENV, Ramp(1, DEFAULT_SEQ_STEP, max_num_seqs), max_num_seqs,
                 "sequence limit (--max-batch-size)")
    blocks = _ramp(environ, BLOCKS_ENV, Ramp(1, DEFAULT_BLOCK_STEP, DEFAULT_MAX_BLOCKS))
    return ShapeBuckets(tokens.sizes(), seqs.sizes(), blocks.sizes())
