"""What a request's client is told: each sampled token read as text and checked against the request's
stop conditions and grammar, and the `RequestOutput` that carries it.

The engine keeps one `RequestState` per request it has accepted; the scheduler keeps the rest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from tokenmill.detokenizer import IncrementalDetokenizer, StopChecker, TokenDecoder
from tokenmill.grammar.matcher import GrammarMatcher
from tokenmill.multimodal.encoder import RequestImages
from tokenmill.outputs import RequestOutput, TokenInfo
from tokenmill.request import FinishReason, Request

logger = logging.getLogger(__name__)


@dataclass
class RequestState:
    """Engine-side bookkeeping for one request beyond what the scheduler tracks."""

    request: Request
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    arrival_time: float
    prompt_logprobs: list[TokenInfo] | None = None
    cumulative_logprob: float = 0.0
    first_output_sent: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    matcher: GrammarMatcher | None = None  # where the request is in its grammar (structured output)
    images: RequestImages | None = None  # the prompt's images, for a vision-language model


class TokenReader:
    """Reads each newly sampled token of a request: its text, its logprobs and whether it ends the request."""

    def __init__(self, tokenizer: Any, eos_token_ids: set[int], max_model_len: int):
        self.decoder = TokenDecoder(tokenizer)
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def take_token(self, state: RequestState, token: int, num_tokens: int, row: int, logprobs: list[float] | None,
                   top_ids: list[list[int]] | None, top_lps: list[list[float]] | None):
        """One new token, the `num_tokens`-th of the request, sampled in `row`: its info, top tokens, the text
        it completes and the reason it ends the request (None: it does not)."""
        request, params = state.request, state.request.sampling_params
        logprob = logprobs[row] if logprobs is not None else None
        if logprob is not None:
            state.cumulative_logprob += logprob
        decoder = self.decoder
        info = TokenInfo(token, logprob, decoder.token_text(token), token in decoder.special_ids)
        tops = []
        if params.top_n_tokens and top_ids is not None:
            tops = [[TokenInfo(t, lp, decoder.token_text(t), t in decoder.special_ids)
                     for t, lp in zip(top_ids[row][: params.top_n_tokens], top_lps[row][: params.top_n_tokens])]]
        # Until min_tokens are out nothing stops generation (the sampler holds the stop tokens back).
        armed = num_tokens - request.num_prompt_tokens >= params.min_tokens
        if armed and token in params.stop_token_ids and not params.include_stop_str_in_output:
            text, stopped = state.stop.add("")  # a stop token's text is dropped, as a stop string's is
        else:
            text, stopped = state.stop.add(state.detokenizer.add(token), check=armed)
        reason = self._finish_reason(request, token, num_tokens, stopped, armed)
        if state.matcher is not None:
            reason = _follow_grammar(state, token, reason)
        return info, tops, text, reason

    def _finish_reason(self, request: Request, token: int, num_tokens: int, stopped: bool,
                       armed: bool) -> FinishReason | None:
        """Why the request ends at `token`, its `num_tokens`-th token; None: it goes on."""
        params = request.sampling_params
        if armed and not params.ignore_eos and token in self.eos_token_ids:
            return FinishReason.EOS_TOKEN
        if stopped or (armed and token in params.stop_token_ids):
            return FinishReason.STOP_SEQUENCE
        if num_tokens - request.num_prompt_tokens >= params.max_new_tokens or num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None


def _follow_grammar(state: RequestState, token: int, reason: FinishReason | None) -> FinishReason | None:
    """Advance the request's grammar by `token`; the grammar's end (its stop token taken) ends the request."""
    if not state.matcher.accept(token):
        # The mask allowed only tokens the grammar accepts; this is a bug, not the client's doing.
        logger.error("request %s: sampled token %d that its grammar refuses", state.request.request_id, token)
        return FinishReason.ERROR
    if state.matcher.terminated:
        return FinishReason.EOS_TOKEN
    return reason


def request_output(state: RequestState, tokens=(), tops=(), text: str = "", finished: bool = False,
                   error: str | None = None) -> RequestOutput:
    """The request's news: `tokens` (their `tops`) and `text` new since the last; when `finished`, its whole
    text and timings too. The first output of a request also carries its prompt logprobs."""
    request = state.request
    out = RequestOutput(
        request_id=request.request_id,
        new_tokens=list(tokens),
        new_top_tokens=list(tops),
        text_delta=text,
        finished=finished,
        finish_reason=request.finish_reason.value if finished and request.finish_reason else None,
        error=error,
        num_prompt_tokens=request.num_prompt_tokens,
        num_generated_tokens=request.num_output_tokens,
        num_cached_tokens=request.num_cached_tokens,
        cumulative_logprob=state.cumulative_logprob,
        seed=request.sampling_params.seed,
    )
    if not state.first_output_sent:
        out.prompt_logprobs = state.prompt_logprobs
        state.first_output_sent = True
    if finished:
        out.generated_text = state.stop.text
        end = time.monotonic()
        start = state.timings.get("first_scheduled", end)
        out.queue_time_s = start - state.arrival_time
        out.inference_time_s = end - start
        out.prefill_time_s = state.timings.get("first_token", end) - start
    return out
