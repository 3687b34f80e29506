"""What a request asks of generation: how to pick tokens, when to stop, what to report."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenmill.errors import ValidationError
from tokenmill.grammar.compiler import GrammarSpec


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings; `temperature` None or 0 means greedy."""

    max_new_tokens: int = 16
    temperature: float | None = None
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    typical_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # transformers' semantics, over prompt and output tokens
    frequency_penalty: float = 0.0  # OpenAI's semantics, over output tokens
    presence_penalty: float = 0.0
    seed: int | None = None  # the draw depends only on (seed, step): batch-independent
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # generation ends on any of these (finish reason: stop_sequence)
    ignore_eos: bool = False
    min_tokens: int = 0  # until this many tokens are out, EOS and stop_token_ids are masked, stop strings unchecked
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to the logits
    watermark: bool = False  # TGI's green-list watermark (tokenmill.watermark), with these two settings:
    watermark_gamma: float = 0.5  # the share of the vocabulary on each green list
    watermark_delta: float = 2.0  # what a green token's logit gains
    include_stop_str_in_output: bool = True  # TGI keeps the stop text; the OpenAI routes drop it
    logprobs: bool = False  # report the chosen tokens' logprobs
    top_n_tokens: int = 0  # report this many most likely alternatives per step
    prompt_logprobs: bool = False  # TGI's decoder_input_details
    skip_special_tokens: bool = True
    grammar: GrammarSpec | None = None  # structured output: the text must match it, and ends where it does

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if self.temperature is not None and self.temperature < 0:
            raise ValidationError("`temperature` must be strictly positive")
        if self.top_k < 0:
            raise ValidationError("`top_k` must be strictly positive")
        if not 0.0 < self.top_p <= 1.0:
            raise ValidationError("`top_p` must be > 0.0 and <= 1.0")
        if not 0.0 < self.typical_p <= 1.0:
            raise ValidationError("`typical_p` must be > 0.0 and <= 1.0")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValidationError("`min_p` must be >= 0.0 and <= 1.0")
        if self.repetition_penalty <= 0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValidationError(f"`{name}` must be >= -2.0 and <= 2.0")
        if self.top_n_tokens < 0:
            raise ValidationError("`top_n_tokens` must be >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValidationError("`seed` must be an unsigned 64-bit integer")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValidationError(f"`min_tokens` must be >= 0 and <= the maximum number of new tokens "
                                  f"({self.max_new_tokens}). Given: {self.min_tokens}")
        for token_id, bias in self.logit_bias:
            if token_id < 0 or not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
                raise ValidationError(f"`logit_bias` maps token ids >= 0 to biases in [-100, 100]. "
                                      f"Given: {token_id}: {bias}")
        if self.watermark and not 0.0 < self.watermark_gamma < 1.0:
            raise ValidationError(f"the watermark's gamma must be > 0.0 and < 1.0. Given: {self.watermark_gamma}")
        if self.watermark and not (math.isfinite(self.watermark_delta) and self.watermark_delta >= 0.0):
            raise ValidationError(f"the watermark's delta must be >= 0.0. Given: {self.watermark_delta}")

    @property
    def is_greedy(self) -> bool:
        return not self.temperature

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
