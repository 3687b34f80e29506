"""What a chat request's `tools`, `tool_choice`, `parallel_tool_calls` and `tool_prompt` ask for.

- `none` (or no tools): a plain answer; the tools are not shown to the model (TGI's rule, and vLLM's
  with `--exclude-tools-when-tool-choice-none`), so it cannot write a call that nobody would read.
- `auto` (the default with tools): the tools go to the chat template, the model answers freely, and
  the `--tool-call-parser` finds calls in its text (`tokenmill.api.tool_parsers`).
- `required` and a named function: forced through the grammar engine, as TGI does: the answer is JSON
  of a JSON schema made from the tools, so every call parses and its arguments match the tool's schema.

A template that cannot render tools (it never reads a `tools` variable) gets them as TGI gives them:
appended to the last message, after `\\n---\\n`, as JSON followed by the tool prompt; `auto` then reads
the reply as the bare JSON call that prompt asks for (the `llama3_json` format).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from tokenmill.api.errors import ToolError
from tokenmill.api.openai_schemas import ChatRequest, Tool
from tokenmill.api.settings import ServerSettings
from tokenmill.api.structured import enabled, openai_grammar
from tokenmill.api.tool_parsers import PARSERS, ToolParser
from tokenmill.grammar import GrammarSpec
from tokenmill.sampling_params import SamplingParams

# TGI's default `tool_prompt`.
DEFAULT_TOOL_PROMPT = ("Given the functions available, please respond with a JSON of a function call with its proper "
                       "arguments that best answers the given prompt. Respond in the format {name: function name, "
                       "parameters: dictionary of argument name and its value}. Do not use variables.")
SEPARATOR = "\n---\n"  # TGI's, between the last message and what it appends
NO_ARGUMENTS = {"type": "object", "properties": {}}  # a function without `parameters` takes none


@dataclass(frozen=True)
class ToolPlan:
    """How a request with tools is served. `grammar` is set in the forced modes (`forced` names the one
    function of a named choice, None for `required`); `parser` reads `auto` answers."""

    tools: tuple[dict[str, Any], ...]  # as the template and the injected prompt get them
    parallel: bool  # the model may make several calls in one answer
    grammar: GrammarSpec | None = None
    forced: str | None = None
    parser: ToolParser | None = None

    @property
    def auto(self) -> bool:
        return self.grammar is None

    def applied(self, params: SamplingParams) -> SamplingParams:
        """`params` with the forced modes' grammar, keeping special tokens where the parser's marker is one."""
        if self.grammar is not None:
            return dataclasses.replace(params, grammar=self.grammar)
        if self.parser.keeps_special_tokens:
            return dataclasses.replace(params, skip_special_tokens=False)
        return params


def plan_tools(body: ChatRequest, settings: ServerSettings, template_renders_tools: bool) -> ToolPlan | None:
    """The plan for `body`, None when it asks for no tool call; a `ToolError` (422) for a choice that
    cannot be served."""
    choice = _choice(body.tool_choice, bool(body.tools))
    if choice == "none":
        return None
    tools = list(body.tools or [])
    _check(tools)
    if openai_grammar(body, settings) is not None:
        raise ToolError("Grammar and tools are mutually exclusive")  # TGI's words
    rendered = tuple(_rendered(t) for t in tools)
    if choice == "auto":
        parser = PARSERS[settings.tool_call_parser if template_renders_tools else "llama3_json"]
        return ToolPlan(rendered, body.parallel_tool_calls, parser=parser)
    if choice == "required":
        schema = _required_schema(tools, body.parallel_tool_calls)
        return ToolPlan(rendered, body.parallel_tool_calls, grammar=enabled(settings, _ordered(schema)))
    tool = next((t for t in tools if t.function.name == choice), None)
    if tool is None:
        raise ToolError(f"`tool_choice` names the function `{choice}`, which is not among `tools`: "
                        f"{', '.join(t.function.name for t in tools)}")
    return ToolPlan(rendered, False, grammar=enabled(settings, _ordered(_arguments(tool))), forced=choice)


def prompt_suffix(plan: ToolPlan, template_renders_tools: bool, tool_prompt: str | None) -> str:
    """What is appended to the last message: TGI's tools JSON and prompt where the template cannot render
    the tools; where it can, only a `tool_prompt` the request gives (the template's own words come first)."""
    if template_renders_tools:
        return SEPARATOR + tool_prompt if tool_prompt else ""
    return f"{SEPARATOR}{json.dumps(list(plan.tools), ensure_ascii=False)}\n{tool_prompt or DEFAULT_TOOL_PROMPT}"


def _choice(value: Any, has_tools: bool) -> str:
    """"none", "auto", "required" or the name of the function to call."""
    if value is None:
        return "auto" if has_tools else "none"
    if isinstance(value, dict):
        function = value.get("function") if value.get("type", "function") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise ToolError("`tool_choice` is \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}")
        value = name
    if value in ("none", "auto"):
        return value
    if not has_tools:
        raise ToolError(f"`tool_choice` {json.dumps(value)} needs `tools` to choose from")
    return value


def _check(tools: list[Tool]) -> None:
    names = [t.function.name for t in tools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ToolError(f"each tool needs its own name; given more than once: {', '.join(twice)}")
    for i, tool in enumerate(tools):
        if _arguments(tool).get("type", "object") != "object":  # arguments are an object, as OpenAI's are
            raise ToolError(f"`tools[{i}].function.parameters` must be the JSON schema of an object (`\"type\": "
                            f"\"object\"`). Given type: {json.dumps(_arguments(tool)['type'])}")


def _rendered(tool: Tool) -> dict[str, Any]:
    """A tool as templates read it; a function without parameters gets an empty object schema, which
    templates that walk `parameters.properties` can render."""
    function = {"name": tool.function.name, "description": tool.function.description, "parameters": _arguments(tool)}
    return {"type": tool.type, "function": {k: v for k, v in function.items() if v is not None}}


def _arguments(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or NO_ARGUMENTS


def _required_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """One call ({"name", "arguments"}, name first) of any of the tools; a non-empty list of them with
    `parallel`."""
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t.function.name}, "arguments": _arguments(t)}} for t in tools]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"type": "array", "items": call, "minItems": 1} if parallel else call


def _ordered(schema: dict[str, Any]) -> GrammarSpec:
    """A JSON-schema grammar that keeps the schema's key order (`GrammarSpec.json_schema` sorts keys): xgrammar
    generates properties in that order, so the name comes before the arguments and the stream can say which
    function is called before its arguments arrive, and the arguments come in the order the tool declares."""
    return GrammarSpec("json", json.dumps(schema, ensure_ascii=False))
