"""Tool calls written by the model in its own format, found in the text of a `tool_choice: auto` answer.

One parser per model family, chosen with `--tool-call-parser` as in vLLM:
- `hermes` (the default): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block a call:
  Hermes, Qwen2.5, Qwen3, SmolLM3 and every template written after them;
- `llama3_json`: the answer is a JSON call, or several separated by `;`, optionally after `<|python_tag|>`:
  Llama 3.1-3.3, and the format TGI's tool prompt asks of a template that cannot render tools;
- `mistral`: `[TOOL_CALLS]` then a JSON list of calls (a special token: kept in the text for this parser).

A parser finds where a call starts (so a stream can stop sending content there) and, on the whole
text, splits it into content and calls. Text with no call, or a call that is not valid JSON of the
expected shape, stays content: a reply is never lost to a parse failure.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


@dataclass(frozen=True)
class Parsed:
    content: str
    calls: tuple[ParsedCall, ...] = ()


def _call(value: Any) -> ParsedCall | None:
    """{"name", "arguments" | "parameters"} as a call, or None when it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text, as the API returns them
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _calls(values: list[Any]) -> tuple[ParsedCall, ...] | None:
    calls = [_call(v) for v in values]
    return None if not calls or None in calls else tuple(calls)


class ToolParser:
    """A model family's tool-call format; subclasses say where calls start and how to read them."""

    name = ""
    keeps_special_tokens = False  # its marker is a special token, which the text must keep

    def start(self, text: str) -> int:
        """Where the first call starts in `text`, or -1 (none yet)."""
        raise NotImplementedError

    def hold_from(self, text: str) -> int:
        """Where the end of `text` (no call in it yet) could be the beginning of a call's marker: a stream
        holds the text from there back until the next token says; len(text) when nothing could be."""
        raise NotImplementedError

    def parse(self, text: str) -> Parsed:
        """The text split into content and calls; all content when there is no well-formed call."""
        raise NotImplementedError


class _MarkerParser(ToolParser):
    marker = ""

    def start(self, text: str) -> int:
        return text.find(self.marker)

    def hold_from(self, text: str) -> int:
        first = max(0, len(text) - len(self.marker) + 1)
        return next((i for i in range(first, len(text)) if self.marker.startswith(text[i:])), len(text))


class HermesParser(_MarkerParser):
    name, marker = "hermes", "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> Parsed:
        at = self.start(text)
        if at < 0:
            return Parsed(text)
        try:
            values = [json.loads(block) for block in self._BLOCK.findall(text[at:])]
        except json.JSONDecodeError:
            return Parsed(text)
        calls = _calls(values)
        return Parsed(text[:at].strip(), calls) if calls else Parsed(text)


class MistralParser(_MarkerParser):
    name, marker = "mistral", "[TOOL_CALLS]"
    keeps_special_tokens = True

    def parse(self, text: str) -> Parsed:
        at = self.start(text)
        if at < 0:
            return Parsed(text)
        try:
            value, _ = json.JSONDecoder().raw_decode(text[at + len(self.marker):].lstrip())
        except json.JSONDecodeError:
            return Parsed(text)
        calls = _calls(value if isinstance(value, list) else [value])
        return Parsed(text[:at].strip(), calls) if calls else Parsed(text)


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    tag = "<|python_tag|>"

    def start(self, text: str) -> int:
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith(("{", self.tag)) else -1

    def hold_from(self, text: str) -> int:
        # Only the opening of the answer can start a call.
        return 0 if self.tag.startswith(text.lstrip()) else len(text)

    def parse(self, text: str) -> Parsed:
        at = self.start(text)
        if at < 0:
            return Parsed(text)
        body = text[at:].removeprefix(self.tag)
        decoder, values, pos = json.JSONDecoder(), [], 0
        try:
            while True:
                value, pos = decoder.raw_decode(body, _skip_space(body, pos))
                values.append(value)
                pos = _skip_space(body, pos)
                if pos >= len(body) or body[pos] != ";":
                    break
                pos += 1
        except json.JSONDecodeError:
            return Parsed(text)
        calls = _calls(values)
        return Parsed("", calls) if calls and not body[pos:].strip() else Parsed(text)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


PARSERS: dict[str, ToolParser] = {p.name: p for p in (HermesParser(), Llama3JsonParser(), MistralParser())}
