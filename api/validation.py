"""TGI's request validation: parameter ranges, limits, token counts; TGI's messages word for word."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from tokenmill.api.errors import UnsupportedError
from tokenmill.api.schemas import GenerateParameters, RequestBody
from tokenmill.api.settings import ServerSettings
from tokenmill.api.structured import tgi_grammar
from tokenmill.api.tracing import tracer
from tokenmill.errors import ValidationError
from tokenmill.multimodal import ImageInput
from tokenmill.sampling_params import SamplingParams


@dataclass(frozen=True)
class ValidRequest:
    prompt_ids: list[int]
    params: SamplingParams
    best_of: int
    return_full_text: bool
    images: Sequence[ImageInput] = ()  # the prompt's images, their tokens in prompt_ids (vision-language models)


def refuse_unsupported(body: RequestBody) -> None:
    """A 422 naming the first refused field whose value asks for something (`RequestBody.refused`)."""
    for path, rule in body.refusals():
        if rule.error_type == "validation":
            raise ValidationError(rule.message_for(path))
        raise UnsupportedError(rule.message_for(path), rule.error_type)


def _check_ranges(p: GenerateParameters, settings: ServerSettings) -> None:
    if p.temperature is not None and p.temperature <= 0:
        raise ValidationError("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise ValidationError("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    if p.max_new_tokens == 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    if len(p.stop) > settings.max_stop_sequences:
        raise ValidationError(f"`stop` supports up to {settings.max_stop_sequences} stop sequences. Given: {len(p.stop)}")
    if p.top_n_tokens is not None and p.top_n_tokens > settings.max_top_n_tokens:
        raise ValidationError(f"`top_n_tokens` must be >= 0 and <= {settings.max_top_n_tokens}. Given: {p.top_n_tokens}")
    refuse_unsupported(p)


def is_sampling(p: GenerateParameters) -> bool:
    """TGI samples when asked to, or when any warper is set away from its neutral value."""
    return bool(p.do_sample or (p.temperature is not None and p.temperature != 1.0) or p.top_k
                or (p.top_p is not None and p.top_p < 1.0) or (p.typical_p is not None and p.typical_p < 1.0))


def _check_best_of(p: GenerateParameters, settings: ServerSettings, stream: bool) -> int:
    best_of = p.best_of or 1
    if best_of == 1:
        return 1
    if settings.max_best_of == 1:
        raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
    if best_of > settings.max_best_of:
        raise ValidationError(f"`best_of` must be > 0 and <= {settings.max_best_of}. Given: {best_of}")
    if not is_sampling(p):
        raise ValidationError("you must use sampling when `best_of` is > 1")
    if p.seed is not None:
        raise ValidationError("`seed` must not be set when `best_of` > 1")
    if stream:
        raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    return best_of


def validate_generate(*args, **kwargs) -> ValidRequest:
    """`_validate_generate` inside a `validation` span."""
    with tracer().start_as_current_span("validation"):
        return _validate_generate(*args, **kwargs)


def _validate_generate(inputs: str, p: GenerateParameters, settings: ServerSettings, tokenizer,
                      stream: bool = False, add_special_tokens: bool = True, default_full_text: bool = False,
                      encoded: tuple[list[int], Sequence[ImageInput]] | None = None) -> ValidRequest:
    """The token ids and sampling parameters for a TGI request, or a ValidationError. `encoded`: the token
    ids and images of `inputs` with markdown images, already expanded (`tokenmill.api.images`)."""
    _check_ranges(p, settings)
    best_of = _check_best_of(p, settings, stream)
    if stream and p.decoder_input_details:
        raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
    if not inputs:
        raise ValidationError("`inputs` cannot be empty")
    ids, images = encoded or (tokenizer(inputs, add_special_tokens=add_special_tokens).input_ids, ())
    if p.truncate is not None:
        if not 0 < p.truncate <= settings.max_input_tokens:
            raise ValidationError(f"`truncate` must be strictly positive and less than {settings.max_input_tokens}. "
                                  f"Given: {p.truncate}")
        ids = ids[-p.truncate :]
    if len(ids) > settings.max_input_tokens:
        raise ValidationError(f"`inputs` must have less than {settings.max_input_tokens} tokens. Given: {len(ids)}")
    max_new = p.max_new_tokens or settings.max_total_tokens - len(ids)
    if len(ids) + max_new > settings.max_total_tokens:
        raise ValidationError(f"`inputs` tokens + `max_new_tokens` must be <= {settings.max_total_tokens}. "
                              f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`")
    sampling = is_sampling(p)
    seed = p.seed if p.seed is not None else (random.getrandbits(63) if sampling else None)
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=(p.temperature or 1.0) if sampling else None,
        # A top_k past the vocabulary keeps every token, as TGI's warper does; passed on unclamped it
        # indexes past the logits and fails the whole batch's step, not just this request.
        top_k=min(p.top_k or 0, len(tokenizer)),
        top_p=p.top_p or 1.0,
        typical_p=p.typical_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        seed=seed,
        stop=tuple(p.stop),
        include_stop_str_in_output=True,
        logprobs=True,
        top_n_tokens=p.top_n_tokens or 0,
        prompt_logprobs=p.decoder_input_details,
        watermark=p.watermark,
        watermark_gamma=settings.watermark_gamma,
        watermark_delta=settings.watermark_delta,
        grammar=tgi_grammar(p.grammar, settings),
    )
    full_text = p.return_full_text if p.return_full_text is not None else default_full_text
    return ValidRequest(ids, params, best_of, full_text, tuple(images))
