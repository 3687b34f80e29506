"""The `auto` parsers on text as models write it, and the readers that turn streamed text into OpenAI's
`tool_calls` deltas: fed a token at a time or all at once, they give the same content and calls."""

from __future__ import annotations

import json

import pytest

from tokenmill.api.tool_calls import NamedReader, ParsedReader, RequiredReader, message, read_all
from tokenmill.api.tool_parsers import PARSERS, ParsedCall

WEATHER = ParsedCall("get_weather", '{"city": "Paris", "unit": "celsius"}')
TIME = ParsedCall("get_time", '{"zone": "CET"}')


@pytest.mark.parametrize("parser, text, content, calls", [
    # Qwen2.5 / Hermes: one block a call, on lines of their own.
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
               '</tool_call>', "", [WEATHER]),
    ("hermes", 'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
               '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}'
               '\n</tool_call>', "Let me check both.", [WEATHER, TIME]),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}</tool_call>', "", [TIME]),
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}', "", [TIME]),  # cut before its end tag
    ("hermes", "Paris is sunny today.", "Paris is sunny today.", []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par</tool_call>', None, []),  # bad JSON
    ("hermes", '<tool_call>{"arguments": {"zone": "CET"}}</tool_call>', None, []),  # no name
    # Llama 3.1: bare JSON with `parameters`, several separated by `;`, maybe after <|python_tag|>.
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "", [WEATHER]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                    '{"name": "get_time", "parameters": {"zone": "CET"}}', "", [WEATHER, TIME]),
    ("llama3_json", ' {"name": "get_time", "arguments": {"zone": "CET"}}', "", [TIME]),
    ("llama3_json", 'The answer is {"name": "get_time"}', None, []),  # a call only opens the answer
    ("llama3_json", '{"answer": 42}', None, []),
    ("llama3_json", '{"name": "get_time", "parameters": {"zone": "CET"}} and more', None, []),
    # Mistral: [TOOL_CALLS] then a JSON list.
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]', "", [WEATHER, TIME]),
    ("mistral", '[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "CET"', None, []),
    ("mistral", "No tool needed.", "No tool needed.", []),
])
def test_parsers_split_content_and_calls(parser, text, content, calls) -> None:
    parsed = PARSERS[parser].parse(text)
    assert list(parsed.calls) == calls
    assert parsed.content == (text if content is None else content)


def _fed_by_pieces(reader, text: str, size: int):
    content, deltas = "", []
    for i in range(0, len(text), size):
        more, new = reader.feed(text[i:i + size])
        content, deltas = content + more, deltas + new
    rest, new = reader.finish()
    return content + rest, deltas + new


def _calls(deltas) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in message("", deltas).get("tool_calls", [])]


@pytest.mark.parametrize("size", [1, 3, 1000])
@pytest.mark.parametrize("text, content, calls", [
    ('Sure.<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>', "Sure.",
     [("get_time", '{"zone": "CET"}')]),
    ("a <tool without a call", "a <tool without a call", []),
    ('<tool_call>{"name": broken</tool_call>', '<tool_call>{"name": broken</tool_call>', []),
])
def test_the_auto_reader_streams_content_and_holds_a_call_until_it_ends(size, text, content, calls) -> None:
    got, deltas = _fed_by_pieces(ParsedReader(PARSERS["hermes"], parallel=True), text, size)
    assert got == content and _calls(deltas) == calls


def test_the_auto_reader_never_sends_a_markers_beginning_as_content() -> None:
    reader = ParsedReader(PARSERS["hermes"], parallel=True)
    assert reader.feed("Hi <tool") == ("Hi ", [])
    assert reader.feed("_ca") == ("", [])
    assert reader.feed("ll>") == ("", [])
    reader = ParsedReader(PARSERS["hermes"], parallel=True)
    assert reader.feed("Hi <tool") == ("Hi ", [])
    assert reader.feed("box") == ("<toolbox", [])


def test_without_parallel_calls_the_auto_reader_keeps_the_first() -> None:
    text = PARSERS["mistral"].marker + json.dumps([{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}])
    assert _calls(read_all(ParsedReader(PARSERS["mistral"], parallel=False), text)[1]) == [("a", "{}")]


@pytest.mark.parametrize("size", [1, 2, 1000])
@pytest.mark.parametrize("text, calls", [
    ('{"name": "get_time", "arguments": {"zone": "C}E\\"T"}}', [("get_time", '{"zone": "C}E\\"T"}')]),
    ('{"name":"f","arguments":{"a":[1,{"b":"]"}],"c":{}}}', [("f", '{"a":[1,{"b":"]"}],"c":{}}')]),
    ('[{"name": "a", "arguments": {}}, {"name": "b\\u00e9", "arguments": {"x": 1}}]', [("a", "{}"), ("bé", '{"x": 1}')]),
])
def test_the_required_reader_streams_each_calls_arguments_as_generated(size, text, calls) -> None:
    content, deltas = _fed_by_pieces(RequiredReader(), text, size)
    assert content == "" and _calls(deltas) == calls
    firsts = [d for d in deltas if d.id is not None]
    assert [d.arguments for d in firsts] == [""] * len(calls) and all(d.id.startswith("call_") for d in firsts)


def test_the_named_reader_sends_the_name_first_then_the_text_as_arguments() -> None:
    reader = NamedReader("get_time")
    _, first = reader.feed('{"zone"')
    _, second = reader.feed(': "CET"}')
    assert [(d.name, d.arguments) for d in first] == [("get_time", ""), (None, '{"zone"')]
    assert [(d.name, d.arguments) for d in second] == [(None, ': "CET"}')]
    assert message("", first + second)["tool_calls"][0]["function"] == {"name": "get_time",
                                                                       "arguments": '{"zone": "CET"}'}
