"""Generated text to OpenAI's `tool_calls`, token by token: one reader a choice, fed each text delta.

A reader returns the content to send and the call deltas in OpenAI's stream shape (a call's first delta
carries its id, type and name with `arguments: ""`, the next ones fragments of the arguments). A
non-streamed answer is the same reader fed the whole text, its deltas merged (`message`), so both
forms give the same calls.

- `NamedReader`: a named `tool_choice`; the text is the arguments, streamed as generated.
- `RequiredReader`: `required`; the text is `{"name": ..., "arguments": {...}}` (or a list of them), the
  name first: the name is held until it is whole, the arguments stream.
- `ParsedReader`: `auto`; content streams until the parser sees a call start, the rest is held and parsed
  when the answer ends. A call that does not parse is sent as the content it was.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from tokenmill.api.tool_parsers import ToolParser
from tokenmill.api.tools import ToolPlan


@dataclass(frozen=True)
class CallDelta:
    index: int  # which call of the answer
    arguments: str
    id: str | None = None  # set on a call's first delta, with its name
    name: str | None = None

    def openai(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


Read = tuple[str, list[CallDelta]]  # (content, call deltas)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class _Reader:
    def __init__(self) -> None:
        self.calls = 0  # calls started

    def _open(self, name: str) -> CallDelta:
        self.calls += 1
        return CallDelta(self.calls - 1, "", new_call_id(), name)

    def feed(self, text: str) -> Read:
        raise NotImplementedError

    def finish(self) -> Read:
        return "", []


class NamedReader(_Reader):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def feed(self, text: str) -> Read:
        deltas = [] if self.calls else [self._open(self.name)]
        return "", deltas + ([CallDelta(0, text)] if text else [])


class RequiredReader(_Reader):
    """Walks the grammar's JSON by character: between calls, in a call's head (up to its arguments), in
    its arguments (counting brackets outside strings), then in its tail (the closing brace)."""

    _HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*$')

    def __init__(self) -> None:
        super().__init__()
        self.state, self.head, self.depth = "between", "", 0
        self.in_string = self.escaped = False

    def feed(self, text: str) -> Read:
        deltas: list[CallDelta] = []
        fragment = []
        for char in text:
            if self.state == "between" and char == "{":
                self.state, self.head = "head", char
            elif self.state == "head":
                self.head += char
                match = self._HEAD.match(self.head)
                if match:
                    deltas.append(self._open(json.loads(match.group(1))))
                    self.state, self.depth = "arguments", 0
            elif self.state == "arguments" and (self.depth or not char.isspace()):  # the value, not the space before it
                fragment.append(char)
                if self._closes(char):
                    deltas.append(CallDelta(self.calls - 1, "".join(fragment)))
                    fragment, self.state = [], "tail"
            elif self.state == "tail" and char == "}":
                self.state = "between"
        if fragment:
            deltas.append(CallDelta(self.calls - 1, "".join(fragment)))
        return "", deltas

    def _closes(self, char: str) -> bool:
        """Whether `char` ends the arguments' JSON value."""
        if self.in_string:
            self.escaped, self.in_string = (False, True) if self.escaped else (char == "\\", char != '"')
            return False
        if char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


class ParsedReader(_Reader):
    def __init__(self, parser: ToolParser, parallel: bool):
        super().__init__()
        self.parser, self.parallel = parser, parallel
        self.text, self.sent, self.in_call = "", 0, False

    def feed(self, text: str) -> Read:
        self.text += text
        if self.in_call:
            return "", []
        start = self.parser.start(self.text)
        self.in_call = start >= 0
        until = start if self.in_call else max(self.sent, self.parser.hold_from(self.text))
        content, self.sent = self.text[self.sent:until], until
        return content, []

    def finish(self) -> Read:
        parsed = self.parser.parse(self.text) if self.in_call else None
        if not parsed or not parsed.calls:
            return self.text[self.sent:], []
        deltas = []
        for call in parsed.calls if self.parallel else parsed.calls[:1]:
            deltas += [self._open(call.name), CallDelta(self.calls - 1, call.arguments)]
        return "", deltas


def reader_for(plan: ToolPlan) -> _Reader:
    if plan.auto:
        return ParsedReader(plan.parser, plan.parallel)
    return NamedReader(plan.forced) if plan.forced else RequiredReader()


def read_all(reader: _Reader, text: str) -> Read:
    content, deltas = reader.feed(text)
    rest, more = reader.finish()
    return content + rest, deltas + more


def message(content: str, deltas: list[CallDelta]) -> dict[str, Any]:
    """A non-streamed assistant message: the deltas merged into whole calls; `content` null when there are
    calls and no text besides them."""
    calls: list[dict[str, Any]] = []
    for delta in deltas:
        if delta.id is not None:
            calls.append(delta.openai())
        else:
            calls[delta.index]["function"]["arguments"] += delta.arguments
    if not calls:
        return {"role": "assistant", "content": content}
    return {"role": "assistant", "content": content.strip() or None, "tool_calls": calls}
