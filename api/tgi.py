"""TGI's own routes: `/generate`, `/generate_stream`, `/`, `/tokenize`, `/info`, `/health`, and the OpenAPI
document where TGI serves it (`/api-doc/openapi.json`)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.api.disconnect import until_disconnected
from tokenmill.api.errors import GENERATION_ERRORS, STREAM_ERRORS, error_responses
from tokenmill.api.schemas import (
    BestOfSequence,
    CompatGenerateRequest,
    Details,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    Token,
    TokenizedToken,
)
from tokenmill.api.service import Generation, GenerationService
from tokenmill.api.sse import SSE_CONTENT, error_event, sse, sse_response
from tokenmill.api.validation import ValidRequest, validate_generate
from tokenmill.errors import ValidationError
from tokenmill.outputs import TokenInfo

router = APIRouter()



def _service(request: Request) -> GenerationService:
    return request.app.state.service


def _ready(request: Request) -> GenerationService:
    return request.app.state.service.checked()


def _logprob(value: float | None) -> float | None:
    """A logprob as TGI's JSON has it: a token a warper removed has -inf, which TGI (serde) writes as null."""
    return value if value is not None and math.isfinite(value) else None


def _token(t: TokenInfo) -> Token:
    return Token(id=t.id, text=t.text, logprob=_logprob(t.logprob), special=t.special)


def _details(g: Generation, with_prefill: bool) -> Details:
    prefill = [PrefillToken(id=t.id, text=t.text, logprob=_logprob(t.logprob)) for t in (g.prompt_logprobs or [])]
    return Details(
        finish_reason=g.finish_reason,
        generated_tokens=len(g.tokens),
        seed=g.seed,
        prefill=prefill if with_prefill else [],
        tokens=[_token(t) for t in g.tokens],
        top_tokens=[[_token(t) for t in step] for step in g.top_tokens] or None,
    )


async def _generate(request: Request, service: GenerationService, body: GenerateRequest,
                    default_full_text: bool) -> JSONResponse:
    start = time.monotonic()
    valid = validate_generate(body.inputs, body.parameters, service.settings, service.tokenizer,
                              add_special_tokens=body.add_special_tokens, default_full_text=default_full_text,
                              encoded=await _with_images(service, body))
    adapter = service.adapter_id(body.parameters.adapter_id)
    validated = time.monotonic()
    with service.admit():
        generations = await until_disconnected(request, _run_best_of(service, valid, adapter))
    best = max(generations, key=lambda g: g.mean_logprob)
    p = body.parameters
    text = (body.inputs if valid.return_full_text else "") + best.text
    response = GenerateResponse(generated_text=text)
    if p.details or p.decoder_input_details:
        response.details = _details(best, p.decoder_input_details)
        others = [g for g in generations if g is not best]
        if others:
            response.details.best_of_sequences = [
                BestOfSequence(generated_text=g.text, **_details(g, p.decoder_input_details).model_dump(
                    exclude={"best_of_sequences"})) for g in others]
    return JSONResponse(_tgi_json(response), headers=timing_headers(
        service.settings, len(body.inputs), start, validated, best.num_prompt_tokens, len(best.tokens),
        best.queue_time_s, best.inference_time_s))


def _tgi_json(response: GenerateResponse) -> dict[str, Any]:
    """TGI's omission rules: `details` only when asked for, `top_tokens` and `best_of_sequences` only when
    there are some; every other null is kept (a greedy request's `seed`, the first prefill token's `logprob`)."""
    out = response.model_dump()
    if out["details"] is None:
        del out["details"]
        return out
    for details in (out["details"], *(out["details"]["best_of_sequences"] or [])):
        for key in ("top_tokens", "best_of_sequences"):
            if key in details and details[key] is None:
                del details[key]
    return out


async def _run_best_of(service: GenerationService, valid: ValidRequest, adapter: str | None) -> list[Generation]:
    if valid.best_of == 1:
        return [await service.complete(valid.prompt_ids, valid.params, adapter, valid.images)]
    variants = [dataclasses.replace(valid.params, seed=random.getrandbits(63)) for _ in range(valid.best_of)]
    return list(await asyncio.gather(*(service.complete(valid.prompt_ids, p, adapter, valid.images)
                                       for p in variants)))


async def _with_images(service: GenerationService, body: GenerateRequest):
    """`inputs`' token ids and images where a vision-language model gets markdown images in it, else None
    (a text-only model reads `![](...)` as text, as TGI's do)."""
    if service.images is None:
        return None
    ids, images = await service.images.from_markdown(body.inputs, body.add_special_tokens)
    return (ids, images) if images else None


def timing_headers(settings, characters: int, start: float, validated: float, prompt_tokens: int,
                   generated_tokens: int, queue_s: float, inference_s: float, compute_time: bool = True
                   ) -> dict[str, str]:
    """TGI's `x-compute-*` headers of a non-streamed answer: times in integer milliseconds, except
    `x-compute-time` in seconds (left out where TGI leaves it out: `/v1/completions`)."""
    total = time.monotonic() - start
    per_token = inference_s / max(1, generated_tokens)
    headers = {
        "x-compute-type": settings.compute_type,
        "x-compute-time": f"{total:.6f}",
        "x-compute-characters": str(characters),
        "x-total-time": str(int(total * 1000)),
        "x-validation-time": str(int((validated - start) * 1000)),
        "x-queue-time": str(int(queue_s * 1000)),
        "x-inference-time": str(int(inference_s * 1000)),
        "x-time-per-token": str(int(per_token * 1000)),
        "x-prompt-tokens": str(prompt_tokens),
        "x-generated-tokens": str(generated_tokens),
    }
    if not compute_time:
        del headers["x-compute-time"]
    return headers


def stream_headers(settings, characters: int) -> dict[str, str]:
    """The `x-compute-*` headers a stream can carry: its status line goes out before any timing is known."""
    return {"x-compute-type": settings.compute_type, "x-compute-characters": str(characters)}


async def _stream_events(service: GenerationService, body: GenerateRequest, default_full_text: bool
                         ) -> AsyncIterator[str]:
    try:
        valid = validate_generate(body.inputs, body.parameters, service.settings, service.tokenizer, stream=True,
                                  encoded=await _with_images(service, body),
                                  add_special_tokens=body.add_special_tokens, default_full_text=default_full_text)
        adapter = service.adapter_id(body.parameters.adapter_id)
        with service.admit():
            index = 0
            async for out in service.stream(valid.prompt_ids, valid.params, adapter, valid.images):
                for i, token in enumerate(out.new_tokens):
                    index += 1
                    event = {"index": index, "token": _token(dataclasses.replace(token, text=out.text_delta))
                             .model_dump(), "generated_text": None, "details": None}
                    if out.new_top_tokens:
                        event["top_tokens"] = [_token(t).model_dump() for t in out.new_top_tokens[i]]
                    if out.finished:
                        prefix = body.inputs if valid.return_full_text else ""
                        event["generated_text"] = prefix + (out.generated_text or "")
                        if body.parameters.details:
                            event["details"] = {"finish_reason": out.finish_reason,
                                                "generated_tokens": out.num_generated_tokens,
                                                "seed": out.seed, "input_length": out.num_prompt_tokens}
                    yield sse(event)
    except Exception as exc:  # noqa: BLE001 - reported in-band: the status line is already sent
        yield error_event(exc)


@router.post("/generate", response_model=GenerateResponse, responses=GENERATION_ERRORS)
async def generate(body: GenerateRequest, request: Request):
    """Generate tokens (TGI)."""
    return await _generate(request, _ready(request), body, default_full_text=False)


@router.post("/generate_stream", response_class=StreamingResponse, responses={
    200: {"description": "Server-sent events, one a token", "content": SSE_CONTENT}, **STREAM_ERRORS})
async def generate_stream(body: GenerateRequest, request: Request):
    """Generate tokens as server-sent events (TGI)."""
    return sse_response(_stream_events(_ready(request), body, default_full_text=False),
                        stream_headers(_service(request).settings, len(body.inputs)))


@router.post("/", response_model=list[GenerateResponse], responses={
    200: {"description": "A list with one response; the events when `stream` is true", "content": SSE_CONTENT},
    **GENERATION_ERRORS})
async def compat_generate(body: CompatGenerateRequest, request: Request):
    """TGI's compatibility route: a list with one response, or the stream when `stream` is true."""
    service = _ready(request)
    if body.stream:
        return sse_response(_stream_events(service, body, default_full_text=True),
                            stream_headers(service.settings, len(body.inputs)))
    response = await _generate(request, service, body, default_full_text=True)
    return JSONResponse([json.loads(response.body)], headers={k: v for k, v in response.headers.items()
                                                              if k.startswith("x-")})


@router.post("/tokenize", response_model=list[TokenizedToken], responses=error_responses(400, 413, 422, 503))
async def tokenize(body: GenerateRequest, request: Request):
    """Tokens of `inputs` with their byte offsets (TGI)."""
    tokenizer = _ready(request).tokenizer
    truncate = body.parameters.truncate
    if truncate == 0:  # as on /generate; unlike there, no upper bound: TGI's /tokenize takes any length
        raise ValidationError(f"`truncate` must be strictly positive. Given: {truncate}")
    encoding = tokenizer(body.inputs, add_special_tokens=body.add_special_tokens, return_offsets_mapping=True)
    ids, offsets = encoding.input_ids, encoding.offset_mapping
    if truncate is not None:
        ids, offsets = ids[-truncate:], offsets[-truncate:]
    tokens = []
    for token_id, (start, stop) in zip(ids, offsets):
        byte_start = len(body.inputs[:start].encode())
        byte_stop = len(body.inputs[:stop].encode())
        tokens.append({"id": token_id, "text": body.inputs[start:stop], "start": byte_start, "stop": byte_stop})
    return tokens


@router.get("/info")
async def info(request: Request):
    """TGI's `Info`, field for field, and `model_implementation`; `router` is TGI's router's name, for clients
    that check it."""
    s = _service(request).settings
    return {
        "model_id": s.model_id, "model_sha": None, "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": s.max_concurrent_requests, "max_best_of": s.max_best_of,
        "max_stop_sequences": s.max_stop_sequences, "max_input_tokens": s.max_input_tokens,
        "max_total_tokens": s.max_total_tokens, "validation_workers": 1,
        "max_client_batch_size": s.max_client_batch_size, "router": "text-generation-router", "version": s.version,
        "sha": None, "docker_label": None,
        # tokenmill's: whose code runs the model ("tokenmill", or "transformers" for the fallback)
        "model_implementation": s.model_implementation,
    }


@router.get("/api-doc/openapi.json", include_in_schema=False)
async def openapi_document(request: Request):
    """The OpenAPI document where TGI serves it; FastAPI's `/openapi.json` is the same document."""
    return JSONResponse(request.app.openapi())


HEALTH = {200: {"description": "Ready"}, **error_responses(503)}


@router.get("/", response_class=Response, responses=HEALTH)
@router.get("/health", response_class=Response, responses=HEALTH)
@router.get("/ping", response_class=Response, responses=HEALTH)
async def health(request: Request):
    """200 once the model is warm, 503 before and while draining (TGI's /, /health and /ping)."""
    service = _service(request)
    if service.ready and not service.draining:
        return Response(status_code=200)
    return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
