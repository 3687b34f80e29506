"""Issue #18's tool-calling acceptance on the served SmolLM2 (`tokenmill serve`, embedded model), through the
`openai` client: with `tool_choice` required and named, streamed and not, the calls' arguments validate
against the tool's schema. SmolLM2's template cannot render tools, so they reach it as TGI's tool prompt."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

pytestmark = pytest.mark.slow

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
STOCK = {"type": "object", "additionalProperties": False, "required": ["ticker"],
         "properties": {"ticker": {"type": "string", "pattern": "^[A-Z]{1,5}$"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_stock_price", "description": "Latest price of a stock",
                                           "parameters": STOCK}}]
SCHEMAS = {"get_weather": WEATHER, "get_stock_price": STOCK}
MESSAGES = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def client(served_smollm2):
    return openai.OpenAI(base_url=f"{served_smollm2}/v1", api_key="unused", max_retries=0, timeout=300)


def test_required_gives_a_call_whose_arguments_validate(client) -> None:
    answer = client.chat.completions.create(model="smollm2", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=40, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_a_named_call_streams_and_its_arguments_validate(client) -> None:
    stream = client.chat.completions.create(model="smollm2", messages=MESSAGES, tools=TOOLS, stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            max_tokens=40, temperature=0.8, seed=3)
    names, arguments, finish = [], "", None
    for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            names += [delta.function.name] if delta.function.name else []
            arguments += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls"
    jsonschema.validate(json.loads(arguments), WEATHER)
