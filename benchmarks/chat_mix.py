"""The realistic-traffic section's requests: a seeded synthetic chat mix, and Poisson arrival times.

Shapes (drawn from `SEED`, so every server and every run gets the same mix):
- user prompt length in tokens of the served model's tokenizer: log-normal, median `PROMPT_MEDIAN`,
  clipped to `PROMPT_TOKENS`;
- output length (`max_tokens`, sent with ignore_eos): log-normal, median `OUTPUT_MEDIAN`, clipped to
  `OUTPUT_TOKENS`;
- exactly a third of the requests carry the one shared system prompt, the rest none.

Text: each prompt is a window of the tokenized corpus (`perplexity_text.txt`, cycled) at a seeded
offset, decoded, behind a marker that names the run and the request. The marker makes every prompt of
every run distinct from its first token, so a prefix cache can only reuse the shared system prompt (as
it would in real traffic), never an earlier rate's prompts. A decoded window can re-tokenize a token
off at its edges, so each request records the length its text really has.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 22
PROMPT_TOKENS = (50, 2000)
PROMPT_MEDIAN, PROMPT_SIGMA = 300, 0.9  # 5th / 95th percentiles about 70 and 1,300 before clipping
OUTPUT_TOKENS = (32, 512)
OUTPUT_MEDIAN, OUTPUT_SIGMA = 128, 0.7  # about 40 and 400
SYSTEM_SHARE = 1 / 3
CORPUS = Path(__file__).resolve().parent / "perplexity_text.txt"
SYSTEM_PROMPT = (
    "You are a patient assistant for a maritime history museum. Answer the visitor's question in plain "
    "words, quote the exhibit text when it helps, say so when the exhibit does not cover something, and "
    "never invent dates or names. Keep each answer to a few short paragraphs unless the visitor asks for "
    "more detail. Visitors range from school children to retired sailors, so explain any technical term "
    "the first time you use it, and prefer examples from the museum's own collection: the lighthouse "
    "lenses in the east gallery, the keepers' logbooks in the archive room, the fog signals in the "
    "courtyard and the model ships on the first floor. If a question is about opening hours, tickets or "
    "accessibility, point the visitor to the front desk instead of answering yourself."
)


@dataclass(frozen=True)
class ChatRequest:
    """One request of the mix: its text, its user-prompt length in tokens and its output length."""

    prompt: str
    prompt_tokens: int
    max_tokens: int
    system: str | None


@dataclass(frozen=True)
class RequestShape:
    prompt_tokens: int
    max_tokens: int
    with_system: bool


def _clipped_lognormal(rng: random.Random, median: float, sigma: float, bounds: tuple[int, int]) -> int:
    low, high = bounds
    return min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))


def sample_shapes(count: int, seed: int = SEED) -> list[RequestShape]:
    """The lengths and system-prompt choice of `count` requests; the same for the same seed."""
    rng = random.Random(seed)
    with_system = set(rng.sample(range(count), round(count * SYSTEM_SHARE)))
    return [RequestShape(_clipped_lognormal(rng, PROMPT_MEDIAN, PROMPT_SIGMA, PROMPT_TOKENS),
                         _clipped_lognormal(rng, OUTPUT_MEDIAN, OUTPUT_SIGMA, OUTPUT_TOKENS),
                         index in with_system)
            for index in range(count)]


def build_mix(tokenizer, count: int, run_tag: str, seed: int = SEED) -> list[ChatRequest]:
    """`count` requests whose prompts are `tokenizer`'s tokens; `run_tag` goes into every marker."""
    corpus = tokenizer.encode(CORPUS.read_text(), add_special_tokens=False)
    offsets = random.Random(seed + 1)
    requests = []
    for index, shape in enumerate(sample_shapes(count, seed)):
        marker = tokenizer.encode(f"[{run_tag} request {index}]\n", add_special_tokens=False)
        start = offsets.randrange(len(corpus))
        window = [corpus[(start + i) % len(corpus)] for i in range(max(1, shape.prompt_tokens - len(marker)))]
        text = tokenizer.decode(marker + window)
        requests.append(ChatRequest(text, len(tokenizer.encode(text, add_special_tokens=False)), shape.max_tokens,
                                    SYSTEM_PROMPT if shape.with_system else None))
    return requests


def unit_rate_arrivals(count: int, seed: int = SEED) -> list[float]:
    """Send times of a Poisson process of rate 1 (the first at 0); divide by a rate to get that rate's.

    Every rate replays the same sequence scaled, so the curve's points differ in rate alone."""
    rng = random.Random(seed + 2)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(1.0)
    return times


def describe(requests: list[ChatRequest]) -> dict:
    """The mix's statistics, for the report."""
    prompts = sorted(r.prompt_tokens for r in requests)
    outputs = sorted(r.max_tokens for r in requests)
    return {"requests": len(requests),
            "prompt_tokens_p50": prompts[len(prompts) // 2], "prompt_tokens_min": prompts[0],
            "prompt_tokens_max": prompts[-1], "prompt_tokens_mean": sum(prompts) / len(prompts),
            "output_tokens_p50": outputs[len(outputs) // 2], "output_tokens_min": outputs[0],
            "output_tokens_max": outputs[-1], "output_tokens_mean": sum(outputs) / len(outputs),
            "with_system_prompt": sum(r.system is not None for r in requests)}
