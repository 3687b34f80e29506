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


@dataclass(frozen=True)
class StepStats:
    """What one engine step ran and how long its phases took: the seam to the batch metrics
    (TGI's `tgi_batch_*`, vLLM's iteration stats). A step that raised has `failed` set."""

    step: int
    num_seqs: int
    num_new_seqs: int  # in their first step: they joined the batch now
    num_prefill_tokens: int
    num_decode_tokens: int
    schedule_s: float = 0.0  # choosing the step's requests: where new ones join the running batch
    forward_s: float = 0.0  # the model and sampling, up to the wait for the device
    filter_s: float = 0.0  # advancing the batch past the step (computed tokens, full blocks committed)
    decode_s: float = 0.0  # detokenizing, stop checks, building the outputs
    total_s: float = 0.0
    failed: bool = False

    @property
    def method(self) -> str:
        """TGI's `method` label: a step that feeds any prompt tokens is a prefill."""
        return "prefill" if self.num_prefill_tokens else "decode"

    @property
    def joined_running(self) -> bool:
        """New requests joined requests already running (TGI counts this as a batch concatenation)."""
        return 0 < self.num_new_seqs < self.num_seqs
