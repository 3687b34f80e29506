"""`POST /invocations`: the one route Amazon SageMaker sends requests to (Hugging Face's TGI containers).

As TGI (router/src/sagemaker.rs): the body is TGI's compatibility request (`inputs`, as on `POST /`,
its `stream` flag included), a chat request (`messages`) or a completion request (`prompt`), tried
in that order. Chat and completion bodies are answered in TGI's dialect (a stop sequence stays in
the text and ends with `stop_sequence`; `presence_penalty` is TGI's), as TGI's own handlers answer.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from tokenmill.api import openai_api, tgi
from tokenmill.api.body_forms import one_of
from tokenmill.api.errors import GENERATION_ERRORS
from tokenmill.api.schemas import CompatGenerateRequest
from tokenmill.api.sse import SSE_CONTENT

router = APIRouter()

SagemakerRequest = one_of(("inputs", "generate", CompatGenerateRequest), ("messages", "chat", openai_api.ChatRequest),
                          ("prompt", "completion", openai_api.CompletionRequest))

RESPONSES = {200: {"description": "What `POST /`, `/v1/chat/completions` or `/v1/completions` answers the body; "
                                  "server-sent events when it asks for a stream",
                   "content": {"application/json": {"schema": {"oneOf": [{"type": "array"}, {"type": "object"}]}},
                               **SSE_CONTENT}},
             **GENERATION_ERRORS}


@router.post("/invocations", responses=RESPONSES)
async def invocations(body: SagemakerRequest, request: Request):
    """Generate from a TGI, chat or completion body (SageMaker's route, as TGI serves it)."""
    if isinstance(body, CompatGenerateRequest):
        return await tgi.compat_generate(body, request)
    # TGI's answers to these bodies (`stop_sequence`, stop text kept, TGI's presence_penalty), as TGI's
    # container gives them on this route; /v1 follows OpenAI's.
    if isinstance(body, openai_api.ChatRequest):
        return await openai_api.serve_chat(body, request, openai_api.TGI)
    return await openai_api.serve_completions(body, request, openai_api.TGI)
