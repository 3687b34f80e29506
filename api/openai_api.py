"""The OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Supersets of TGI's where TGI is narrower than OpenAI: `n` > 1 is honoured, `stop` may be a string,
`top_p` 1.0 is accepted, ids are unique, and the stop text is dropped from the output as OpenAI does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from pydantic import Field

from tokenmill.api.disconnect import until_disconnected
from tokenmill.api.errors import GENERATION_ERRORS, TemplateError, UnsupportedError
from tokenmill.api.schemas import RequestBody
from tokenmill.api.service import Generation, GenerationService
from tokenmill.api.sse import SSE_CONTENT, error_event, sse, sse_response
from tokenmill.errors import ValidationError
from tokenmill.sampling_params import SamplingParams

router = APIRouter(prefix="/v1")


class StreamOptions(RequestBody):
    include_usage: bool = False


class _Common(RequestBody):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    logprobs: Any = None
    top_logprobs: int | None = Field(None, ge=0)
    # vLLM's extension, which benchmarks and load tools send to get a fixed number of tokens.
    ignore_eos: bool = False


class ChatMessage(RequestBody):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str]
    suffix: str | None = None
    echo: bool = False


def _service(request: Request) -> GenerationService:
    return request.app.state.service


def _ready(request: Request) -> GenerationService:
    return request.app.state.service.checked()


def _text_of(message: ChatMessage) -> str:
    if isinstance(message.content, list):
        return "".join(part.get("text", "") for part in message.content if part.get("type") == "text")
    return message.content or ""


def _sampling(body: _Common, service: GenerationService, prompt_len: int, top_n: int) -> SamplingParams:
    settings = service.settings
    if prompt_len > settings.max_input_tokens:
        raise ValidationError(f"`inputs` must have less than {settings.max_input_tokens} tokens. Given: {prompt_len}")
    max_new = body.max_completion_tokens or body.max_tokens or settings.max_total_tokens - prompt_len
    if prompt_len + max_new > settings.max_total_tokens:
        raise ValidationError(f"`inputs` tokens + `max_new_tokens` must be <= {settings.max_total_tokens}. "
                              f"Given: {prompt_len} `inputs` tokens and {max_new} `max_new_tokens`")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > settings.max_stop_sequences:
        raise ValidationError(f"`stop` supports up to {settings.max_stop_sequences} stop sequences. Given: {len(stops)}")
    if top_n > settings.max_top_n_tokens:
        raise ValidationError(f"`top_n_tokens` must be >= 0 and <= {settings.max_top_n_tokens}. Given: {top_n}")
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(
        max_new_tokens=max_new, temperature=temperature or None, top_p=body.top_p or 1.0, seed=body.seed,
        stop=tuple(stops), include_stop_str_in_output=False, logprobs=True, top_n_tokens=top_n,
        frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0, ignore_eos=body.ignore_eos,
    )


def _finish(reason: str | None) -> str | None:
    return {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}.get(reason, reason)


def _seeded(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of n: a distinct seed when the request gave one, so choices differ reproducibly."""
    if index == 0 or params.seed is None:
        return params
    import dataclasses

    return dataclasses.replace(params, seed=(params.seed + index) % 2**64)  # wraps: a seed near 2**64 stays a u64


def _chat_logprobs(g: Generation, top_n: int) -> dict[str, Any]:
    content = []
    for i, t in enumerate(g.tokens):
        tops = g.top_tokens[i] if i < len(g.top_tokens) else []
        content.append({"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                        "top_logprobs": [{"token": x.text, "logprob": x.logprob, "bytes": list(x.text.encode())}
                                         for x in tops[:top_n]]})
    return {"content": content}


def _base(kind: str, model: str) -> dict[str, Any]:
    return {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()), "model": model, "system_fingerprint": "tokenmill-0.1.0"}


@router.get("/models")
async def models(request: Request):
    model_id = _service(request).settings.model_id
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}]}


RESPONSES = {200: {"description": "The completion; server-sent events when `stream` is true",
                   "content": {"application/json": {"schema": {"type": "object"}}, **SSE_CONTENT}}, **GENERATION_ERRORS}


@router.post("/chat/completions", responses=RESPONSES)
async def chat_completions(body: ChatRequest, request: Request):
    service = _ready(request)
    if body.tools:
        raise UnsupportedError("tools are not supported yet", "tool_error")
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        raise ValidationError("grammar is not supported")
    if not body.messages:
        raise ValidationError("`messages` must contain at least one message")
    tokenizer = service.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template not found")
    continue_final = body.messages[-1].role == "assistant"
    try:
        text = tokenizer.apply_chat_template([{"role": m.role, "content": _text_of(m)} for m in body.messages],
                                             tokenize=False, add_generation_prompt=not continue_final)
    except Exception as exc:  # noqa: BLE001 - jinja errors of every kind become 422 template_error
        raise TemplateError(str(exc)) from exc
    prompt = service.encode(text, add_special_tokens=False)
    top_n = body.top_logprobs or 0 if body.logprobs else 0
    params = _sampling(body, service, len(prompt), top_n)
    model = body.model or service.settings.model_id
    if body.stream:
        return sse_response(_chat_stream(service, body, prompt, params, model))
    with service.admit():
        generations = await until_disconnected(request, asyncio.gather(
            *(service.complete(prompt, _seeded(params, i)) for i in range(body.n))))
    choices = [{"index": i, "message": {"role": "assistant", "content": g.text},
                "logprobs": _chat_logprobs(g, top_n) if body.logprobs else None,
                "finish_reason": _finish(g.finish_reason)} for i, g in enumerate(generations)]
    completion = sum(len(g.tokens) for g in generations)
    return {**_base("chat.completion", model), "object": "chat.completion", "choices": choices,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                      "total_tokens": len(prompt) + completion}}


async def _merged(service: GenerationService, jobs: list[tuple[int, list[int], SamplingParams]]):
    """(choice index, output) from concurrent streams, as they come; an error in any ends them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, ids: list[int], params: SamplingParams) -> None:
        try:
            async for out in service.stream(ids, params):
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


async def _chat_stream(service, body: ChatRequest, prompt, params, model) -> AsyncIterator[str]:
    base = {**_base("chat.completion", model), "object": "chat.completion.chunk"}
    completion = 0
    try:
        with service.admit():
            jobs = [(i, prompt, _seeded(params, i)) for i in range(body.n)]
            async for index, out in _merged(service, jobs):
                completion += len(out.new_tokens)
                logprobs = None
                if body.logprobs and out.new_tokens:
                    logprobs = {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                                             "top_logprobs": []} for t in out.new_tokens]}
                choice = {"index": index, "delta": {"role": "assistant", "content": out.text_delta},
                          "logprobs": logprobs, "finish_reason": _finish(out.finish_reason) if out.finished else None}
                yield sse({**base, "choices": [choice], "usage": None})
        if body.stream_options and body.stream_options.include_usage:
            usage = {"prompt_tokens": len(prompt), "completion_tokens": completion,
                     "total_tokens": len(prompt) + completion}
            yield sse({**base, "choices": [], "usage": usage})
    except Exception as exc:  # noqa: BLE001 - reported in-band, then [DONE]
        yield error_event(exc)
    yield sse("[DONE]")


@router.post("/completions", responses=RESPONSES)
async def completions(body: CompletionRequest, request: Request):
    service = _ready(request)
    if body.suffix:
        raise UnsupportedError("Suffix is not supported and can be achieved by preprocessing the prompt.",
                               "suffix not supported")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise ValidationError("`prompt` must be a string or a list of at least one string")
    if len(prompts) > service.settings.max_client_batch_size:
        raise UnsupportedError(f"Number of prompts exceeds the maximum allowed batch size of "
                               f"{service.settings.max_client_batch_size}", "batch size exceeded")
    encoded = [service.encode(p) for p in prompts]
    params = [_sampling(body, service, len(ids), 0) for ids in encoded]
    model = body.model or service.settings.model_id
    jobs = [(i * body.n + k, ids, _seeded(p, k)) for i, (ids, p) in enumerate(zip(encoded, params))
            for k in range(body.n)]
    if body.stream:
        return sse_response(_completion_stream(service, jobs, model))
    with service.admit():
        generations = await until_disconnected(request, asyncio.gather(
            *(service.complete(ids, p) for _, ids, p in jobs)))
    choices = [{"index": index, "text": (prompts[index // body.n] if body.echo else "") + g.text, "logprobs": None,
                "finish_reason": _finish(g.finish_reason)} for (index, _, _), g in zip(jobs, generations)]
    prompt_tokens = sum(len(ids) for ids in encoded)
    completion = sum(len(g.tokens) for g in generations)
    return {**_base("text_completion", model), "object": "text_completion", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}


async def _completion_stream(service, jobs, model) -> AsyncIterator[str]:
    base = {**_base("text_completion", model), "object": "text_completion"}
    try:
        with service.admit():
            async for index, out in _merged(service, jobs):
                choice = {"index": index, "text": out.text_delta, "logprobs": None,
                          "finish_reason": _finish(out.finish_reason) if out.finished else None}
                yield sse({**base, "choices": [choice]})
    except Exception as exc:  # noqa: BLE001 - reported in-band, then [DONE]
        yield error_event(exc)
    yield sse("[DONE]")
