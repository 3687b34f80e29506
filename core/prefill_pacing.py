"""How many prompt tokens a step may feed beside running decodes, so those decodes' next token is not late.

A step that feeds 2,000 prompt tokens beside 16 decodes makes each of them wait for the whole prefill: on
two cores with SmolLM2 that was a 700 ms gap in their streams, where a decode step alone takes 20 ms. The
pacer learns from finished steps what a prompt token costs and what the decodes alone cost, and gives the
next step's prompts the tokens that keep it near `target_s` (the step budget still caps them). With no
decode running, prompts get the whole budget: nothing is waiting on them, and a long prompt's first
token comes soonest in one step. Where the decodes alone take more than half the target (a big model, many
streams), prompts get as long as the decodes take, and at least a floor of tokens, so they keep moving.

Pacing never holds a prompt back for long: once the oldest prompt still feeding has waited `PATIENCE_TARGETS`
step targets (1 s at the default 100 ms), the step feeds the whole budget, as TGI forces a prefill after
`--max-waiting-tokens` steps. A model whose decodes alone outlast the target (the 1B at 64 streams: 190 ms)
is fed prompts slower than a closed loop brings them, so they queue: its TTFT p99 was 7.7 s (4.0 s unpaced),
5.7 s with the patience. Its throughput stays 0.92x of no pacing either way: a paced prompt's stream idles,
and a step costs nearly the same with fewer decode rows (`--step-target-ms 0` is that trade).

Estimates are exponential moving averages over steps (time is the engine's wall clock around a step, so
Python, sampling and the forward all count). Until a prompt step has been seen, the budget is not cut.
"""

from __future__ import annotations

from dataclasses import dataclass

# Weight of the newest step in each moving average: a few steps follow a change of load.
SMOOTHING = 0.25
# Steps with fewer prompt tokens say little about a prompt token's own cost (the decodes beside dominate).
MIN_OBSERVED_PREFILL = 32
# How many step targets a prompt may wait, counted in the time of steps run since it arrived, before a step
# feeds prompts the whole budget.
PATIENCE_TARGETS = 10


@dataclass
class PrefillPacer:
    target_s: float  # wall time a step beside running decodes should take
    floor_tokens: int  # prompt tokens a step may always feed, however slow the decodes alone are
    decode_step_s: float | None = None  # a step of decodes alone
    prefill_token_s: float | None = None  # one prompt token's share of a step
    clock_s: float = 0.0  # the time of every step observed so far: how long a queued prompt has waited

    @property
    def patience_s(self) -> float:
        return PATIENCE_TARGETS * self.target_s

    def __post_init__(self) -> None:
        if self.target_s <= 0 or self.floor_tokens < 1:
            raise ValueError("the pacer needs a positive target and a floor of at least one token")

    def observe(self, num_prefill_tokens: int, num_decode_tokens: int, seconds: float) -> None:
        """A finished step: its prompt tokens, its decode tokens and how long it took."""
        self.clock_s += seconds
        if num_prefill_tokens == 0 and num_decode_tokens > 0:
            self.decode_step_s = _moving(self.decode_step_s, seconds)
        elif num_prefill_tokens >= MIN_OBSERVED_PREFILL:
            decodes_s = (self.decode_step_s or 0.0) if num_decode_tokens else 0.0
            self.prefill_token_s = _moving(self.prefill_token_s, max(seconds - decodes_s, 0.0) / num_prefill_tokens)

    def prefill_tokens(self, budget: int, queued_since_s: float | None = None) -> int:
        """Prompt tokens the next step may feed beside decodes, out of `budget`; `queued_since_s` is the clock
        when the oldest prompt still feeding arrived."""
        if not self.prefill_token_s:
            return budget
        if queued_since_s is not None and self.clock_s - queued_since_s >= self.patience_s:
            return budget
        decodes_s = self.decode_step_s or 0.0
        # Where the decodes alone take more than half the target, prompts still get as long as they do: a
        # paced step at most doubles a stream's gap, and a big model's prompts are not starved.
        spare_s = max(self.target_s - decodes_s, decodes_s)
        return max(min(self.floor_tokens, budget), min(budget, int(spare_s / self.prefill_token_s)))


def _moving(average: float | None, value: float) -> float:
    return value if average is None else average + SMOOTHING * (value - average)
