"""Tool calling on /v1/chat/completions (issue #18, item 3), through the `openai` client, on tiny models with
a character-level tokenizer and a hermes-style chat template.

Forced modes (`required`, a named function) go through the grammar: on random weights every call still
parses and its arguments validate. `auto` is shown on a tiny model taught to answer with a hermes call:
the server parses it out of the generated text. The client's loop (call, tool result, answer) renders
the history through the template."""

from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from tests.api.conftest import CHAT_TEMPLATE, TinyServer  # noqa: E402
from tests.api.taught_model import taught_tiny  # noqa: E402
from tests.tiny_models import char_tokenizer  # noqa: E402
from tokenmill.api.tools import DEFAULT_TOOL_PROMPT, SEPARATOR  # noqa: E402

WEATHER_ARGS = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                              "maximum": 9}}}
TIME_ARGS = {"type": "object", "additionalProperties": False, "required": ["zone"],
             "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast",
                                           "parameters": WEATHER_ARGS}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME_ARGS}}]
SCHEMAS = {"get_weather": WEATHER_ARGS, "get_time": TIME_ARGS}
USER = [{"role": "user", "content": "Weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}
# Qwen2.5's hermes format, on one line (the character tokenizer has no newline): the tools, earlier calls
# as <tool_call> blocks, tool results as <tool_response>.
HERMES_TEMPLATE = (
    "{%- if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}assistant: {% for c in m.tool_calls %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}|"
    "{%- elif m.role == 'tool' %}tool: <tool_response>{{ m.content }}</tool_response>|"
    "{%- else %}{{ m.role }}: {{ m.content }}|{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}</tool_call>'


@pytest.fixture(scope="module")
def server():
    server = TinyServer(tokenizer=char_tokenizer(), chat_template=HERMES_TEMPLATE, max_concurrent_requests=8)
    yield server
    server.stop()


def _client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _create(server, **kwargs):
    kwargs = {"model": "tiny-llama", "messages": USER, "tools": TOOLS, "max_tokens": 100, "temperature": 0, **kwargs}
    return _client(server).chat.completions.create(**kwargs)


def _streamed(server, **kwargs) -> tuple[list, dict[int, dict], str | None]:
    """The chunks' tool-call deltas, the calls they add up to (by index) and the last finish reason."""
    deltas, calls, finish = [], {}, None
    for chunk in _create(server, stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                deltas.append(delta)
                call = calls.setdefault(delta.index, {"id": delta.id, "name": delta.function.name, "arguments": ""})
                call["arguments"] += delta.function.arguments or ""
    return deltas, calls, finish


def _valid(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_forced_calls_validate_against_the_tools_schema(server, tool_choice, parallel) -> None:
    # Seed 6: random weights that, allowed, make two calls and close the list (others go on to max_tokens).
    choice = _create(server, tool_choice=tool_choice, parallel_tool_calls=parallel, temperature=1.0, seed=6,
                     max_tokens=150).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert len(calls) == (2 if parallel and tool_choice == "required" else 1)
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        _valid(call.function.name, call.function.arguments)
    if tool_choice == NAMED:
        assert [c.function.name for c in calls] == ["get_time"]


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_forced_calls_stream_the_name_first_then_the_arguments(server, tool_choice) -> None:
    deltas, calls, finish = _streamed(server, tool_choice=tool_choice, parallel_tool_calls=False)
    assert finish == "tool_calls" and len(calls) == 1
    first, *fragments = deltas
    assert first.id.startswith("call_") and first.type == "function" and first.function.arguments == ""
    assert len(fragments) > 1 and all(d.id is None and d.function.name is None for d in fragments)
    _valid(calls[0]["name"], calls[0]["arguments"])
    whole = _create(server, tool_choice=tool_choice, parallel_tool_calls=False).choices[0].message.tool_calls[0]
    assert (whole.function.name, whole.function.arguments) == (calls[0]["name"], calls[0]["arguments"])


def test_the_clients_loop_sends_the_call_and_the_result_back_through_the_template(server) -> None:
    call = _create(server, tool_choice="required", parallel_tool_calls=False).choices[0].message
    history = USER + [call.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "sunny, 24 C"}]
    answer = _create(server, messages=history, max_tokens=8)
    assert answer.choices[0].message.tool_calls is None and isinstance(answer.choices[0].message.content, str)
    # The template saw the call and the result: the prompt is exactly its rendering of the whole history.
    tokenizer = char_tokenizer()
    tokenizer.chat_template = HERMES_TEMPLATE
    for message in history:
        for c in message.get("tool_calls", []):
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    prompt = tokenizer.apply_chat_template(history, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    name = call.tool_calls[0].function.name
    assert f'<tool_call>{{"name": "{name}"' in prompt and "<tool_response>sunny, 24 C</tool_response>" in prompt
    assert answer.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)


@pytest.fixture(scope="module")
def taught_server():
    """A tiny model that answers the weather question, with the tools offered, by a hermes call."""
    tokenizer = char_tokenizer()
    tokenizer.chat_template = HERMES_TEMPLATE
    prompt = tokenizer.apply_chat_template(USER, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    answer = tokenizer(CALL, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    tiny = taught_tiny(tokenizer(prompt, add_special_tokens=False).input_ids, answer)
    server = TinyServer(tokenizer=char_tokenizer(), tiny=tiny, chat_template=HERMES_TEMPLATE)
    yield server
    server.stop()


def test_auto_parses_the_models_hermes_call_out_of_its_text(taught_server) -> None:
    choice = _create(taught_server).choices[0]  # tool_choice auto: the default with tools
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris", "days": 2})
    deltas, calls, finish = _streamed(taught_server, tool_choice="auto")
    assert finish == "tool_calls" and [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris", "days": 2})]
    assert deltas[0].id.startswith("call_") and deltas[0].function.arguments == ""


def test_auto_without_a_call_in_the_text_is_content(server) -> None:
    choice = _create(server, max_tokens=12).choices[0]  # random weights write no <tool_call>
    assert choice.message.tool_calls is None and choice.message.content and choice.finish_reason != "tool_calls"


def test_tool_choice_none_shows_the_model_no_tools(server, taught_server) -> None:
    plain = _create(server, tools=openai.NOT_GIVEN, max_tokens=2).usage.prompt_tokens
    assert _create(server, tool_choice="none", max_tokens=2).usage.prompt_tokens == plain
    assert _create(server, tool_choice="auto", max_tokens=2).usage.prompt_tokens > plain
    choice = _create(taught_server, tool_choice="none", max_tokens=20).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason != "tool_calls"


def test_a_template_without_tools_gets_tgis_tool_prompt_appended() -> None:
    server = TinyServer(tokenizer=char_tokenizer(), chat_template=CHAT_TEMPLATE)
    try:
        plain = _create(server, tools=openai.NOT_GIVEN, max_tokens=2).usage.prompt_tokens
        suffix = f"{SEPARATOR}{json.dumps(TOOLS)}\n{DEFAULT_TOOL_PROMPT}"  # one token a character
        assert _create(server, max_tokens=2).usage.prompt_tokens == plain + len(suffix)
        own = _create(server, max_tokens=2, extra_body={"tool_prompt": "Call one."}).usage.prompt_tokens
        assert own == plain + len(suffix) - len(DEFAULT_TOOL_PROMPT) + len("Call one.")
        choice = _create(server, tool_choice=NAMED).choices[0]
        _valid("get_time", choice.message.tool_calls[0].function.arguments)
    finally:
        server.stop()


def _post(server, **body) -> httpx.Response:
    body = {"messages": USER, "max_tokens": 4, **body}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize("body, status, error_type, words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_news"}}}, 422, "tool_error",
     "`get_news`, which is not among `tools`"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, 422, "validation", "name"),
    ({"tool_choice": "required"}, 422, "tool_error", "needs `tools`"),
    ({"tools": TOOLS + TOOLS[:1]}, 422, "tool_error", "given more than once: get_weather"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, 422, "tool_error", "`tool_choice` is"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": "get_time"}}, 422, "tool_error",
     "`tool_choice` is"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, 422,
     "tool_error", "`tools[0].function.parameters` must be the JSON schema of an object"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, 422, "tool_error",
     "Grammar and tools are mutually exclusive"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integr"}}}}}], "tool_choice": "required"}, 422, "validation",
     "the json grammar could not be compiled"),
    ({"functions": [{"name": "f"}]}, 422, "tool_error", "send `tools` and `tool_choice`"),
])
def test_bad_tool_requests_are_422_before_any_output(server, body, status, error_type, words) -> None:
    for stream in (False, True):
        response = _post(server, stream=stream, **body)
        assert response.status_code == status, response.text
        assert response.json()["error_type"] == error_type and words in response.json()["error"]


def test_without_grammar_support_forced_modes_are_refused_and_auto_still_parses() -> None:
    server = TinyServer(tokenizer=char_tokenizer(), chat_template=HERMES_TEMPLATE, disable_grammar_support=True)
    try:
        refused = _post(server, tools=TOOLS, tool_choice="required")
        assert refused.status_code == 422 and "grammar is not supported" in refused.json()["error"]
        assert _post(server, tools=TOOLS, tool_choice="auto").status_code == 200
    finally:
        server.stop()


def test_tool_call_parser_flag_and_variable_reach_the_settings(monkeypatch) -> None:
    from tokenmill.api.server import ServeOptions, make_settings
    from tokenmill.cli import build_parser
    from tokenmill.engine import EngineConfig

    assert build_parser().parse_args(["serve", "--enable-auto-tool-choice"]).tool_call_parser == "hermes"
    monkeypatch.setenv("TOOL_CALL_PARSER", "mistral")
    assert build_parser().parse_args(["serve"]).tool_call_parser == "mistral"
    args = build_parser().parse_args(["serve", "--tool-call-parser", "llama3_json"])
    options = ServeOptions(engine=EngineConfig(), tool_call_parser=args.tool_call_parser)
    assert make_settings(options, "m", 64, "cpu").tool_call_parser == "llama3_json"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--tool-call-parser", "qwen"])
