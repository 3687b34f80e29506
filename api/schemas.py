"""Request and response bodies of TGI's routes (`/generate`, `/generate_stream`, `/`, `/tokenize`), and
the rule every request body follows: each of its fields is honoured or refused, never silently ignored.

Each request model names its `honoured` fields (the server acts on them) and its `refused` ones with
a `Refusal` (a value that asks for something this server cannot do is a 422 naming the field); a
field in neither is a bug that `tests/api/test_request_fields.py` catches. Unknown fields are ignored,
as TGI and vLLM ignore them, and logged, as vLLM logs them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Refusal:
    """Why a request field is refused. A value that asks for nothing passes: None, an empty list or
    object, the field's default, or one of `accepted`; any other is answered with 422 and `message`
    (default: "`<field>` is not supported: <reason>"), of TGI's `error_type`."""

    reason: str
    accepted: tuple[Any, ...] = ()
    error_type: str = "validation"
    message: str | None = None  # the whole message, where clients expect TGI's own words

    def asks_nothing(self, value: Any, default: Any) -> bool:
        return value is None or value == default or value in self.accepted or value in ([], {})

    def message_for(self, path: str) -> str:
        return self.message or f"`{path}` is not supported: {self.reason}"


class RequestBody(BaseModel):
    """A request body (or part of one): finite numbers and valid UTF-8 text, else 422 in TGI's shape.

    Python's JSON parser accepts `NaN` and `Infinity`, which would pass every range check (a NaN
    temperature compares false to everything) and reach the sampler.
    """

    model_config = ConfigDict(allow_inf_nan=False, extra="allow")
    honoured: ClassVar[frozenset[str]] = frozenset()  # fields the server acts on
    refused: ClassVar[dict[str, Refusal]] = {}  # fields it refuses, unless their value asks for nothing

    @model_validator(mode="after")
    def _valid_text(self):
        for name in type(self).model_fields:
            _check_text(getattr(self, name))
        if self.model_extra:
            logger.warning("%s: ignored unknown fields %s", type(self).__name__, sorted(self.model_extra))
        return self

    def refusals(self, prefix: str = "") -> Iterator[tuple[str, Refusal]]:
        """(field path, refusal) for each refused field whose value asks for something, nested bodies too."""
        for name, field in type(self).model_fields.items():
            value, path = getattr(self, name), f"{prefix}{name}"
            rule = type(self).refused.get(name)
            if rule is not None and not rule.asks_nothing(value, field.default):
                yield path, rule
            children = value if isinstance(value, list) else [value]
            for i, child in enumerate(children):
                if isinstance(child, RequestBody):
                    yield from child.refusals(f"{path}[{i}]." if isinstance(value, list) else f"{path}.")


class GenerateParameters(RequestBody):
    honoured: ClassVar[frozenset[str]] = frozenset({
        "best_of", "decoder_input_details", "details", "do_sample", "frequency_penalty", "max_new_tokens",
        "repetition_penalty", "return_full_text", "seed", "stop", "temperature", "top_k", "top_n_tokens", "top_p",
        "truncate", "typical_p", "watermark",
        "adapter_id",  # LoRA adapters (issue #17, item 7)
        "grammar",  # structured output (issue #18): tokenmill.api.structured
    })

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
    honoured: ClassVar[frozenset[str]] = frozenset({"inputs", "parameters", "add_special_tokens"})

    inputs: str
    parameters: GenerateParameters = Field(default_factory=_default_parameters)
    add_special_tokens: bool = True


class CompatGenerateRequest(GenerateRequest):
    honoured: ClassVar[frozenset[str]] = GenerateRequest.honoured | {"stream"}

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
