"""How OpenAI request bodies become sampling parameters (the vLLM extensions load tools send included)."""

from types import SimpleNamespace

from tokenmill.api.openai_api import ChatRequest, _sampling
from tokenmill.api.settings import ServerSettings


def _params(**body):
    service = SimpleNamespace(settings=ServerSettings(model_id="m", max_input_tokens=100, max_total_tokens=200))
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}], **body)
    return _sampling(request, service, prompt_len=10, top_n=0)


def test_ignore_eos_reaches_the_engine() -> None:
    assert _params(ignore_eos=True, max_tokens=8).ignore_eos is True
    assert _params(max_tokens=8).ignore_eos is False


def test_temperature_zero_is_greedy() -> None:
    assert _params(temperature=0).temperature is None
