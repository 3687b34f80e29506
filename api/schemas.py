"""Request and response bodies of TGI's routes (`/generate`, `/generate_stream`, `/`, `/tokenize`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


def _check_text(value: Any) -> None:
    """Every string in `value` must be encodable as UTF-8: JSON's `\\ud800` escape decodes to a lone
    surrogate, which the tokenizer would choke on (500) if it got that far."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"text must be valid UTF-8: lone surrogate at character {exc.start}") from None
    elif isinstance(value, dict):
        for item in value.values():
            _check_text(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_text(item)


class RequestBody(BaseModel):
    """A request body (or part of one): finite numbers and valid UTF-8 text, else 422 in TGI's shape.

    Python's JSON parser accepts `NaN` and `Infinity`, which would pass every range check (a NaN
    temperature compares false to everything) and reach the sampler.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="after")
    def _valid_text(self):
        for name in type(self).model_fields:
            _check_text(getattr(self, name))
        return self


class GenerateParameters(RequestBody):
    best_of: int | None = Field(None, ge=1)
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Any = None
    max_new_tokens: int | None = Field(None, ge=0)
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = Field(None, ge=0)
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = Field(None, ge=0)
    top_p: float | None = None
    truncate: int | None = Field(None, ge=0)  # an unsigned integer, as in TGI; 0 is refused at validation
    typical_p: float | None = None
    watermark: bool = False
    adapter_id: str | None = None


def _default_parameters() -> GenerateParameters:
    # TGI samples when `parameters` is omitted entirely (router/src/lib.rs default_parameters).
    return GenerateParameters(do_sample=True)


class GenerateRequest(RequestBody):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=_default_parameters)
    add_special_tokens: bool = True


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool = False


class TokenizedToken(BaseModel):
    """One token of `/tokenize`: its text and its byte span in the input."""

    id: int
    text: str
    start: int
    stop: int


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class Details(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class ErrorResponse(BaseModel):
    """Every error body, on every route, as TGI answers it."""

    error: str
    error_type: str
