"""A generation request's state as the engine tracks it: tokens, progress through them, blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from tokenmill.multimodal.inputs import ImageSpan, image_block_keys


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why generation ended; the first three are TGI's `finish_reason` values."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    ABORTED = "aborted"  # cancelled by the client
    ERROR = "error"  # could not be served (e.g. needs more KV blocks than the cache has)


@dataclass(eq=False)
class Request:
    """One sequence. `token_ids` is the prompt followed by the generated tokens.

    The uniform scheduling rule: each step, `num_computed_tokens` catches up with `len(token_ids)` by
    however many tokens the step grants; a request samples a token when it has caught up.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any
    arrival_index: int = 0
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (a counter, for stats and tests)
    block_ids: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks already registered in the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    finish_message: str = ""
    num_preemptions: int = 0
    adapter: int = 0  # the LoRA adapter's slot (`tokenmill.lora`); 0: the base model
    queued_at_s: float = 0.0  # the prefill pacer's clock when it arrived (`tokenmill.prefill_pacing`)
    # Speculative decoding (`tokenmill.speculate`): tokens guessed to follow `token_ids`, fed with the last
    # token at the next step and verified there; never part of `token_ids` until verified.
    draft_token_ids: list[int] = field(default_factory=list)
    # The prompt's images and their token positions (`tokenmill.multimodal`); their content keys the prefix
    # cache blocks that hold their tokens.
    images: tuple[ImageSpan, ...] = ()
    image_keys: tuple[tuple[int, bytes], ...] = field(init=False, default=())
    # The tokens transformers' first forward of this sequence covers: its prompt, or, after a longrope
    # switch recomputed it, the whole sequence then (`tokenmill.layers.rotary`, `AttentionMetadata.rope_lengths`).
    rope_prefill_length: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.image_keys = image_block_keys(self.images)
        self.rope_prefill_length = self.rope_prefill_length or len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens the next step may feed: those not computed yet, then the draft."""
        return self.num_tokens + len(self.draft_token_ids) - self.num_computed_tokens

    def pending_token_ids(self, start: int, count: int) -> list[int]:
        """`count` tokens from position `start` of the tokens followed by the draft."""
        tokens = self.token_ids[start : start + count]
        if len(tokens) < count:
            tokens += self.draft_token_ids[: count - len(tokens)]
        return tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
