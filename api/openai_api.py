"""The OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Supersets of TGI's where TGI is narrower than OpenAI: `n` > 1 is honoured, `stop` may be a string,
`top_p` 1.0 is accepted, ids are unique, and vLLM's sampling extensions (`top_k`, `min_p`,
`min_tokens`, `stop_token_ids`, `logit_bias`, ...) work. Where TGI's answers differ from OpenAI's,
these routes follow OpenAI (the `OPENAI` dialect): a stop sequence is dropped from the text and ends
with `finish_reason: "stop"`, and `presence_penalty` is OpenAI's. TGI's own routes that take these
bodies (SageMaker's `/invocations`) pass the `TGI` dialect to `serve_chat` and `serve_completions`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from opentelemetry import trace

from tokenmill.api import chat_template
from tokenmill.api.disconnect import until_disconnected
from tokenmill.api.errors import GENERATION_ERRORS, UnsupportedError
from tokenmill.api.openai_schemas import ChatMessage, ChatRequest, CompletionRequest, StreamOptions, _Common
from tokenmill.api.service import Generation, GenerationService
from tokenmill.api.sse import SSE_CONTENT, error_event, sse, sse_response
from tokenmill.api.tgi import stream_headers, timing_headers
from tokenmill.api.structured import openai_grammar
from tokenmill.api.tool_calls import message, read_all, reader_for
from tokenmill.api.tools import ToolPlan, plan_tools, prompt_suffix
from tokenmill.api.validation import refuse_unsupported
from tokenmill.errors import ValidationError
from tokenmill.multimodal import ImageInput
from tokenmill.outputs import TokenInfo
from tokenmill.sampling_params import SamplingParams

__all__ = ["ChatMessage", "ChatRequest", "CompletionRequest", "StreamOptions", "OPENAI", "TGI", "serve_chat",
           "serve_completions"]

router = APIRouter(prefix="/v1")

LOGPROB_FLOOR = -9999.0  # vLLM's stand-in for the -inf of a token a warper removed (JSON has no -inf)


@dataclass(frozen=True)
class Dialect:
    """Where TGI's answers on these bodies differ from OpenAI's, which one a route gives."""

    keep_stop_text: bool  # TGI keeps a matched stop sequence in the text; OpenAI drops it
    stop_reason: str  # a stop sequence's finish_reason: TGI's "stop_sequence", OpenAI's "stop"
    presence_as_repetition: bool  # TGI reads presence_penalty p as repetition_penalty p + 2


OPENAI = Dialect(keep_stop_text=False, stop_reason="stop", presence_as_repetition=False)
TGI = Dialect(keep_stop_text=True, stop_reason="stop_sequence", presence_as_repetition=True)


def _service(request: Request) -> GenerationService:
    return request.app.state.service


def _ready(request: Request) -> GenerationService:
    return request.app.state.service.checked()


# ---- request -> sampling parameters ---------------------------------------------------------------


def _sampling(body: _Common, service: GenerationService, prompt_len: int, top_n: int,
              dialect: Dialect = OPENAI) -> SamplingParams:
    settings = service.settings
    if prompt_len > settings.max_input_tokens:
        raise ValidationError(f"`inputs` must have less than {settings.max_input_tokens} tokens. Given: {prompt_len}")
    max_new = getattr(body, "max_completion_tokens", None) or body.max_tokens or settings.max_total_tokens - prompt_len
    if prompt_len + max_new > settings.max_total_tokens:
        raise ValidationError(f"`inputs` tokens + `max_new_tokens` must be <= {settings.max_total_tokens}. "
                              f"Given: {prompt_len} `inputs` tokens and {max_new} `max_new_tokens`")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > settings.max_stop_sequences:
        raise ValidationError(f"`stop` supports up to {settings.max_stop_sequences} stop sequences. Given: {len(stops)}")
    if top_n > settings.max_top_n_tokens:
        raise ValidationError(f"`top_n_tokens` must be >= 0 and <= {settings.max_top_n_tokens}. Given: {top_n}")
    temperature = 1.0 if body.temperature is None else body.temperature
    repetition, presence = body.repetition_penalty, body.presence_penalty or 0.0
    if dialect.presence_as_repetition and body.presence_penalty is not None:
        repetition, presence = repetition or body.presence_penalty + 2.0, 0.0
    return SamplingParams(
        max_new_tokens=max_new, temperature=temperature or None, top_p=body.top_p or 1.0,
        top_k=max(body.top_k or 0, 0), min_p=body.min_p or 0.0, seed=body.seed, stop=tuple(stops),
        stop_token_ids=tuple(body.stop_token_ids or ()), min_tokens=body.min_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output or dialect.keep_stop_text,
        logprobs=True, top_n_tokens=top_n, frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=presence, repetition_penalty=repetition or 1.0, ignore_eos=body.ignore_eos,
        logit_bias=_logit_bias(body.logit_bias, len(service.tokenizer)),
        skip_special_tokens=body.skip_special_tokens, grammar=openai_grammar(body, settings),
    )


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token ids (as strings) to biases in [-100, 100]: -100 bans a token, 100 all but forces it."""
    pairs = []
    for key, value in (bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise ValidationError(f"`logit_bias` keys are token ids. Given: {key!r}") from None
        if not 0 <= token_id < vocab_size:
            raise ValidationError(f"`logit_bias` token ids must be in [0, {vocab_size - 1}]. Given: {token_id}")
        if not -100.0 <= value <= 100.0:
            raise ValidationError(f"`logit_bias` values must be in [-100, 100]. Given: {value} for token {token_id}")
        pairs.append((token_id, value))
    return tuple(pairs)


def _truncated(ids: list[int], keep: int | None, settings) -> list[int]:
    """vLLM's `truncate_prompt_tokens`: the last `keep` tokens (-1: as many as the server takes)."""
    if keep is None:
        return ids
    if keep == 0:
        raise ValidationError("`truncate_prompt_tokens` must be >= 1, or -1 for as many as fit. Given: 0")
    return ids[-(settings.max_input_tokens if keep == -1 else keep):]


def _prepare(body: _Common) -> float:
    """What every request does first: note the time, refuse what cannot be honoured, record the end user."""
    start = time.monotonic()
    refuse_unsupported(body)
    if body.user:
        trace.get_current_span().set_attribute("enduser.id", body.user)
    return start


def _finish(reason: str | None, dialect: Dialect) -> str | None:
    return {"eos_token": "stop", "stop_sequence": dialect.stop_reason, "length": "length"}.get(reason, reason)


def _seeded(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of n: a distinct seed when the request gave one, so choices differ reproducibly."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) % 2**64)  # wraps: a seed near 2**64 stays a u64


def _base(kind: str, model: str, request_id: str | None) -> dict[str, Any]:
    prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
    return {"id": f"{prefix}-{request_id or uuid.uuid4().hex}", "created": int(time.time()), "model": model,
            "system_fingerprint": "tokenmill-0.1.0"}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- logprobs ---------------------------------------------------------------------------------------


def _logprob(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else LOGPROB_FLOOR


def _chat_logprobs(tokens: Sequence[TokenInfo], tops: Sequence[Sequence[TokenInfo]], top_n: int) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: per token its logprob and its `top_n` most likely alternatives."""
    def entry(t: TokenInfo) -> dict[str, Any]:
        return {"token": t.text, "logprob": _logprob(t.logprob), "bytes": list(t.text.encode())}

    return {"content": [{**entry(t), "top_logprobs": [entry(x) for x in (tops[i] if i < len(tops) else [])[:top_n]]}
                        for i, t in enumerate(tokens)]}


def _completion_logprobs(tokens: Sequence[TokenInfo], tops: Sequence[Sequence[TokenInfo]], offset: int,
                         first_has_none: bool = False) -> dict[str, Any]:
    """OpenAI's legacy `logprobs`: tokens, their logprobs, the alternatives (the chosen token always among
    them) and each token's character offset in the text, from `offset`. `first_has_none`: the first token
    opens the prompt, with no logprob and no alternatives."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, t in enumerate(tokens):
        out["tokens"].append(t.text)
        out["token_logprobs"].append(_logprob(t.logprob))
        if i == 0 and first_has_none:
            out["top_logprobs"].append(None)
        else:
            alternatives = {x.text: _logprob(x.logprob) for x in (tops[i] if i < len(tops) else [])}
            out["top_logprobs"].append({**alternatives, t.text: _logprob(t.logprob)})
        out["text_offset"].append(offset)
        offset += len(t.text)
    return out


# ---- routes -----------------------------------------------------------------------------------------


@router.get("/models")
async def models(request: Request):
    """The served model, then each LoRA adapter, whose `parent` is the model (as vLLM lists them)."""
    settings = _service(request).settings
    model_id = settings.model_id
    adapters = [{"id": name, "object": "model", "created": 0, "owned_by": model_id, "parent": model_id}
                for name in settings.adapters]
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id},
                                       *adapters]}


RESPONSES = {200: {"description": "The completion; server-sent events when `stream` is true",
                   "content": {"application/json": {"schema": {"type": "object"}}, **SSE_CONTENT}}, **GENERATION_ERRORS}


@router.post("/chat/completions", responses=RESPONSES)
async def chat_completions(body: ChatRequest, request: Request):
    return await serve_chat(body, request, OPENAI)


@router.post("/completions", responses=RESPONSES)
async def completions(body: CompletionRequest, request: Request):
    return await serve_completions(body, request, OPENAI)


async def serve_chat(body: ChatRequest, request: Request, dialect: Dialect):
    """A chat completion, streamed or not, answered in `dialect`."""
    service = _ready(request)
    adapter = service.model_adapter(body.model)  # a LoRA adapter's name, or None: the base model
    start = _prepare(body)
    if body.top_logprobs and not body.logprobs:
        raise ValidationError("`top_logprobs` needs `logprobs: true`")
    renders_tools = chat_template.renders_tools(service.tokenizer)
    plan = plan_tools(body, service.settings, renders_tools)
    tools, suffix = (plan.tools, prompt_suffix(plan, renders_tools, body.tool_prompt)) if plan else ((), "")
    text = chat_template.render(body, service.tokenizer, tools, suffix, images=service.images is not None)
    images = []
    if service.images is not None:  # a vision-language model: its processor expands the images' placeholders
        files = await service.images.read_all(chat_template.image_urls(body))
        ids, images = service.images.encode(text, files, body.add_special_tokens)
    else:
        ids = service.encode(text, add_special_tokens=body.add_special_tokens)
    prompt = _truncated(ids, body.truncate_prompt_tokens, service.settings)
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    params = _sampling(body, service, len(prompt), top_n, dialect)
    if plan is not None:
        params = plan.applied(params)
    await service.compile_grammar(params.grammar)  # one that cannot compile is a 422, even when streamed
    model = body.model or service.settings.model_id
    last = body.messages[-1]
    echo = chat_template.message_text(last, len(body.messages) - 1) if body.echo and last.role == "assistant" else ""
    validated = time.monotonic()
    if body.stream:
        return sse_response(_chat_stream(service, body, prompt, params, model, echo, dialect, adapter, plan, images),
                            stream_headers(service.settings, len(text)))
    with service.admit():
        generations = await until_disconnected(request, asyncio.gather(
            *(service.complete(prompt, _seeded(params, i), adapter, images) for i in range(body.n))))
    choices = []
    for i, g in enumerate(generations):
        content, calls = read_all(reader_for(plan), echo + g.text) if plan else (echo + g.text, [])
        choices.append({"index": i, "message": message(content, calls),
                        "logprobs": _chat_logprobs(g.tokens, g.top_tokens, top_n) if body.logprobs else None,
                        "finish_reason": _chat_finish(g.finish_reason, dialect, bool(calls))})
    completion = sum(len(g.tokens) for g in generations)
    payload = {**_base("chat.completion", model, body.request_id), "object": "chat.completion", "choices": choices,
               "usage": _usage(len(prompt), completion)}
    headers = timing_headers(service.settings, len(text), start, validated, len(prompt), completion,
                             max(g.queue_time_s for g in generations), max(g.inference_time_s for g in generations))
    return JSONResponse(payload, headers=headers)


def _chat_finish(reason: str | None, dialect: Dialect, called: bool) -> str | None:
    """OpenAI's "tool_calls" for an answer that called a tool and ended by itself (not cut by max tokens)."""
    finish = _finish(reason, dialect)
    return "tool_calls" if called and finish not in (None, "length") else finish


async def serve_completions(body: CompletionRequest, request: Request, dialect: Dialect):
    """A text completion of one or more prompts, streamed or not, answered in `dialect`."""
    service = _ready(request)
    adapter = service.model_adapter(body.model)  # a LoRA adapter's name, or None: the base model
    start = _prepare(body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise ValidationError("`prompt` must be a string or a list of at least one string")
    if len(prompts) > service.settings.max_client_batch_size:
        raise UnsupportedError(f"Number of prompts exceeds the maximum allowed batch size of "
                               f"{service.settings.max_client_batch_size}", "batch size exceeded")
    encoded = [_truncated(service.encode(p, add_special_tokens=body.add_special_tokens), body.truncate_prompt_tokens,
                          service.settings) for p in prompts]
    top_n = body.logprobs or 0
    echo_logprobs = body.echo and body.logprobs is not None
    params = [dataclasses.replace(_sampling(body, service, len(ids), top_n, dialect), prompt_logprobs=echo_logprobs)
              for ids in encoded]
    await service.compile_grammar(params[0].grammar)  # one that cannot compile is a 422, even when streamed
    model = body.model or service.settings.model_id
    jobs = [(i * body.n + k, ids, _seeded(p, k)) for i, (ids, p) in enumerate(zip(encoded, params))
            for k in range(body.n)]
    validated = time.monotonic()
    if body.stream:
        return sse_response(_completion_stream(service, body, jobs, prompts, model, dialect, adapter),
                            stream_headers(service.settings, sum(len(p) for p in prompts)))
    with service.admit():
        generations = await until_disconnected(request, asyncio.gather(
            *(service.complete(ids, p, adapter) for _, ids, p in jobs)))
    choices = [_completion_choice(body, index, prompts[index // body.n], g, dialect)
               for (index, _, _), g in zip(jobs, generations)]
    prompt_tokens = sum(len(ids) for ids in encoded)
    completion = sum(len(g.tokens) for g in generations)
    payload = {**_base("text_completion", model, body.request_id), "object": "text_completion", "choices": choices,
               "usage": _usage(prompt_tokens, completion)}
    # TGI sums its headers over the prompts and sends no x-compute-time here.
    headers = timing_headers(service.settings, sum(len(p) for p in prompts), start, validated, prompt_tokens,
                             completion, sum(g.queue_time_s for g in generations),
                             sum(g.inference_time_s for g in generations), compute_time=False)
    return JSONResponse(payload, headers=headers)


def _completion_choice(body: CompletionRequest, index: int, prompt: str, g: Generation, dialect: Dialect) -> dict:
    prefix = prompt if body.echo else ""
    logprobs = None
    if body.logprobs is not None:
        logprobs = _completion_logprobs(g.tokens, g.top_tokens, len(prefix))
        if body.echo and g.prompt_logprobs:
            logprobs = _joined(_completion_logprobs(g.prompt_logprobs, [], 0, first_has_none=True), logprobs)
    return {"index": index, "text": prefix + g.text, "logprobs": logprobs,
            "finish_reason": _finish(g.finish_reason, dialect)}


def _joined(first: dict[str, list], second: dict[str, list]) -> dict[str, list]:
    return {key: first[key] + second[key] for key in first}


# ---- streams ----------------------------------------------------------------------------------------


async def _merged(service: GenerationService, jobs: list[tuple[int, list[int], SamplingParams]],
                  adapter: str | None, images: Sequence[ImageInput] = ()):
    """(choice index, output) from concurrent streams, as they come; an error in any ends them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, ids: list[int], params: SamplingParams) -> None:
        try:
            async for out in service.stream(ids, params, adapter, images):
                await queue.put((index, out))
        except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((index, exc))
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(*job)) for job in jobs]
    try:
        done = 0
        while done < len(jobs):
            index, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


class _Usage:
    """Token counts of a stream so far, for `stream_options`."""

    def __init__(self, options: StreamOptions | None, prompt_tokens: int):
        self.options = options or StreamOptions()
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def every_chunk(self) -> dict[str, Any]:
        """What a chunk carries: the usage so far with `continuous_usage_stats`, else nothing."""
        if self.options.continuous_usage_stats:
            return {"usage": _usage(self.prompt_tokens, self.completion_tokens)}
        return {}

    def last_chunk(self, base: dict[str, Any]) -> list[str]:
        if not self.options.include_usage:
            return []
        return [sse({**base, "choices": [], "usage": _usage(self.prompt_tokens, self.completion_tokens)})]


async def _chat_stream(service, body: ChatRequest, prompt, params, model, echo: str, dialect: Dialect,
                       adapter: str | None, plan: ToolPlan | None, images: Sequence[ImageInput] = ()
                       ) -> AsyncIterator[str]:
    base = {**_base("chat.completion", model, body.request_id), "object": "chat.completion.chunk"}
    usage = _Usage(body.stream_options, len(prompt))
    started: set[int] = set()
    readers = {i: reader_for(plan) for i in range(body.n)} if plan else {}
    try:
        with service.admit():
            jobs = [(i, prompt, _seeded(params, i)) for i in range(body.n)]
            async for index, out in _merged(service, jobs, adapter, images):
                usage.completion_tokens += len(out.new_tokens)
                logprobs = None
                if body.logprobs and out.new_tokens:
                    logprobs = _chat_logprobs(out.new_tokens, out.new_top_tokens, params.top_n_tokens)
                text = out.text_delta if index in started else echo + out.text_delta
                started.add(index)
                reader = readers.get(index)
                deltas = _chat_deltas(reader, text, out.finished)
                if not deltas and (logprobs or out.finished):
                    deltas = [{}]  # a chunk for the logprobs and finish reason of text the reader holds
                finish = _chat_finish(out.finish_reason, dialect, bool(reader and reader.calls)) if out.finished else None
                for k, delta in enumerate(deltas):
                    choice = {"index": index, "delta": {"role": "assistant", **delta},
                              "logprobs": logprobs if k == 0 else None,
                              "finish_reason": finish if k == len(deltas) - 1 else None}
                    yield sse({**base, "choices": [choice], "usage": None, **usage.every_chunk()})
        for event in usage.last_chunk(base):
            yield event
    except Exception as exc:  # noqa: BLE001 - reported in-band, then [DONE]
        yield error_event(exc)
    yield sse("[DONE]")


def _chat_deltas(reader, text: str, finished: bool) -> list[dict[str, Any]]:
    """The deltas one engine output makes: its content; with tools, what the reader lets through and one delta
    per call piece (OpenAI sends a call's name and each arguments fragment apart)."""
    if reader is None:
        return [{"content": text}]
    content, calls = reader.feed(text)
    if finished:
        rest, more = reader.finish()
        content, calls = content + rest, calls + more
    return ([{"content": content}] if content else []) + [{"tool_calls": [c.openai()]} for c in calls]


async def _completion_stream(service, body: CompletionRequest, jobs, prompts: list[str], model, dialect: Dialect,
                             adapter: str | None) -> AsyncIterator[str]:
    base = {**_base("text_completion", model, body.request_id), "object": "text_completion"}
    usage = _Usage(body.stream_options, sum(len(ids) for _, ids, _ in jobs))
    offsets: dict[int, int] = {}  # characters sent so far, per choice: the next token's text_offset
    try:
        with service.admit():
            async for index, out in _merged(service, jobs, adapter):
                usage.completion_tokens += len(out.new_tokens)
                # With `echo`, the first chunk of a choice opens with its prompt.
                prefix = prompts[index // body.n] if body.echo and index not in offsets else ""
                logprobs = None
                if body.logprobs is not None:
                    offset = offsets.get(index, 0) + len(prefix)
                    logprobs = _completion_logprobs(out.new_tokens, out.new_top_tokens, offset)
                    if prefix and out.prompt_logprobs:
                        logprobs = _joined(_completion_logprobs(out.prompt_logprobs, [], 0, first_has_none=True),
                                           logprobs)
                text = prefix + out.text_delta
                offsets[index] = offsets.get(index, 0) + len(text)
                choice = {"index": index, "text": text, "logprobs": logprobs,
                          "finish_reason": _finish(out.finish_reason, dialect) if out.finished else None}
                yield sse({**base, "choices": [choice], **usage.every_chunk()})
        for event in usage.last_chunk(base):
            yield event
    except Exception as exc:  # noqa: BLE001 - reported in-band, then [DONE]
        yield error_event(exc)
    yield sse("[DONE]")
