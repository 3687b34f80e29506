"""How OpenAI request bodies become sampling parameters (the vLLM extensions load tools send included)."""

from types import SimpleNamespace

import pytest

from tests.tiny_models import tiny_tokenizer
from tokenmill.api.openai_api import ChatRequest, _sampling
from tokenmill.api.settings import ServerSettings
from tokenmill.errors import ValidationError


def _params(**body):
    service = SimpleNamespace(settings=ServerSettings(model_id="m", max_input_tokens=100, max_total_tokens=200),
                              tokenizer=tiny_tokenizer())
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}], **body)
    return _sampling(request, service, prompt_len=10, top_n=0)


def test_ignore_eos_reaches_the_engine() -> None:
    assert _params(ignore_eos=True, max_tokens=8).ignore_eos is True
    assert _params(max_tokens=8).ignore_eos is False


def test_temperature_zero_is_greedy() -> None:
    assert _params(temperature=0).temperature is None


def _dialect_params(dialect, **body):
    service = SimpleNamespace(settings=ServerSettings(model_id="m", max_input_tokens=100, max_total_tokens=200),
                              tokenizer=tiny_tokenizer())
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}], **body)
    return _sampling(request, service, prompt_len=10, top_n=0, dialect=dialect)


def test_presence_penalty_is_openais_on_v1_and_tgis_on_tgi_routes() -> None:
    from tokenmill.api.openai_api import OPENAI, TGI

    openai = _dialect_params(OPENAI, presence_penalty=0.5)
    assert (openai.presence_penalty, openai.repetition_penalty) == (0.5, 1.0)
    tgi = _dialect_params(TGI, presence_penalty=0.5)  # TGI: repetition_penalty = presence_penalty + 2
    assert (tgi.presence_penalty, tgi.repetition_penalty) == (0.0, 2.5)
    assert _dialect_params(TGI).repetition_penalty == 1.0
    assert tgi.include_stop_str_in_output and not openai.include_stop_str_in_output


def test_vllm_sampling_extensions_reach_the_engine() -> None:
    params = _params(top_k=5, min_p=0.2, min_tokens=3, max_tokens=8, stop_token_ids=[9, 10],
                     logit_bias={"7": -100, "8": 2.5}, skip_special_tokens=False, include_stop_str_in_output=True)
    assert (params.top_k, params.min_p, params.min_tokens, params.stop_token_ids) == (5, 0.2, 3, (9, 10))
    assert params.logit_bias == ((7, -100.0), (8, 2.5))
    assert params.skip_special_tokens is False and params.include_stop_str_in_output is True
    assert _params(top_k=-1).top_k == 0  # vLLM's "off"


@pytest.mark.parametrize("body, message", [
    (dict(logit_bias={"x": 1}), "`logit_bias` keys are token ids"),
    (dict(logit_bias={"999999": 1}), "`logit_bias` token ids must be in [0, 255]"),
    (dict(logit_bias={"5": 101}), "`logit_bias` values must be in [-100, 100]"),
    (dict(min_tokens=9, max_tokens=8), "`min_tokens` must be >= 0 and <= the maximum number of new tokens (8)"),
])
def test_out_of_range_extensions_are_refused_naming_them(body, message) -> None:
    with pytest.raises(ValidationError) as error:
        _params(**body)
    assert message in str(error.value)
