"""vLLM's utility routes: `/tokenize` with vLLM's bodies (next to TGI's), `/detokenize`, `/version`.

`/tokenize` takes TGI's body (`inputs`, answered by `tgi.tokenize`: tokens with byte offsets) or
vLLM's (`prompt`, or chat `messages` rendered with the chat template), answered as vLLM does:
`{"count", "max_model_len", "tokens", "token_strs"}`. Errors keep TGI's `{error, error_type}` body, as
on every route.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from tokenmill.api import chat_template, tgi
from tokenmill.api.body_forms import one_of
from tokenmill.api.errors import error_responses
from tokenmill.api.openai_schemas import NO_MULTIMODAL, ChatMessage, ChatRequest
from tokenmill.api.schemas import GenerateRequest, Refusal, RequestBody, TokenizedToken
from tokenmill.api.validation import refuse_unsupported
from tokenmill.errors import ValidationError

router = APIRouter()

# `model` picks nothing here: a model and its adapters share one tokenizer.


class TokenizeCompletionRequest(RequestBody):
    honoured: ClassVar[frozenset[str]] = frozenset({"model", "prompt", "add_special_tokens", "return_token_strs"})

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(RequestBody):
    """vLLM's chat form, rendered as `/v1/chat/completions` renders its messages (`chat_template.render`)."""

    honoured: ClassVar[frozenset[str]] = frozenset({
        "model", "messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
        "return_token_strs", "chat_template_kwargs", "documents"})
    refused: ClassVar[dict[str, Refusal]] = {
        "chat_template": Refusal("the model's own chat template is used; a request cannot replace it"),
        "tools": Refusal("tools are not supported yet, so no prompt holds them"),
        "mm_processor_kwargs": Refusal(NO_MULTIMODAL),
    }

    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's default here (the chat route continues a last assistant turn)
    add_special_tokens: bool = False  # the chat template holds them
    return_token_strs: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    tools: list[dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    honoured: ClassVar[frozenset[str]] = frozenset({"model", "tokens"})

    model: str | None = None
    tokens: list[int] = Field(description="Token ids, each within the vocabulary")


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


TokenizeRequest = one_of(("inputs", "tgi", GenerateRequest), ("prompt", "completion", TokenizeCompletionRequest),
                         ("messages", "chat", TokenizeChatRequest))
ERRORS = error_responses(400, 413, 422, 503, auth=True)


def _ready(request: Request):
    return request.app.state.service.checked()


def _chat_prompt(tokenizer, body: TokenizeChatRequest) -> str:
    chat = ChatRequest(messages=body.messages, continue_final_message=body.continue_final_message,
                       chat_template_kwargs=body.chat_template_kwargs, documents=body.documents,
                       **body.model_dump(include={"add_generation_prompt"}, exclude_unset=True))
    return chat_template.render(chat, tokenizer)


@router.post("/tokenize", response_model=list[TokenizedToken] | TokenizeResponse, responses=ERRORS)
async def tokenize(body: TokenizeRequest, request: Request):
    """Tokens of a text: TGI's body (`inputs`) gets TGI's answer, vLLM's (`prompt` or `messages`) vLLM's."""
    if isinstance(body, GenerateRequest):
        return await tgi.tokenize(body, request)
    service = _ready(request)
    refuse_unsupported(body)
    tokenizer = service.tokenizer
    if isinstance(body, TokenizeChatRequest):
        ids = service.encode(_chat_prompt(tokenizer, body), add_special_tokens=body.add_special_tokens)
    else:
        ids = service.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=service.settings.max_total_tokens, tokens=ids,
                            token_strs=tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request):
    """The text of token ids (vLLM)."""
    tokenizer = _ready(request).tokenizer
    vocabulary = len(tokenizer)
    for token in body.tokens:
        if not 0 <= token < vocabulary:
            raise ValidationError(f"token id {token} is outside the vocabulary: ids go from 0 to {vocabulary - 1}")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))


@router.get("/version", response_model=VersionResponse)
async def version(request: Request):
    """The server's version (vLLM)."""
    return VersionResponse(version=request.app.state.service.settings.version)
