"""What the engine reports per request per step: the seam to the serving layer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenInfo:
    id: int
    logprob: float | None
    text: str = ""  # the token's own text (TGI's per-token `text`)
    special: bool = False


@dataclass
class RequestOutput:
    """One step's news about a request: usually one new token, and the text it completed."""

    request_id: str
    new_tokens: list[TokenInfo] = field(default_factory=list)
    new_top_tokens: list[list[TokenInfo]] = field(default_factory=list)  # per new token, when asked
    text_delta: str = ""  # safe to show: never half a character, never part of a stop string
    finished: bool = False
    finish_reason: str | None = None  # "length", "eos_token", "stop_sequence", "aborted", "error"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[TokenInfo] | None = None  # in the first output, when asked (first is None-logprob)
    generated_text: str | None = None  # the whole text, in the final output
    cumulative_logprob: float = 0.0
    seed: int | None = None
    queue_time_s: float | None = None  # in the final output: arrival to first step
    inference_time_s: float | None = None  # in the final output: first step to the end
    prefill_time_s: float | None = None  # in the final output: first step to first token (part of inference)
