"""Structured output as each API asks for it, mapped onto one `GrammarSpec`.

TGI: `parameters.grammar` {type: json | json_object | json_schema | regex, value}. OpenAI: `response_format`
{type: text | json_object | json_schema}. vLLM: `structured_outputs` {json, regex, choice, grammar,
json_object} and the older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`. A request
asks for one constraint at most; `--disable-grammar-support` refuses them all with TGI's message.
"""

from __future__ import annotations

from typing import Any

from tokenmill.api.settings import ServerSettings
from tokenmill.errors import ValidationError
from tokenmill.grammar import GrammarSpec

DISABLED = "grammar is not supported"  # TGI's words under --disable-grammar-support


def enabled(settings: ServerSettings, spec: GrammarSpec | None) -> GrammarSpec | None:
    if spec is not None and settings.disable_grammar_support:
        raise ValidationError(DISABLED)
    return spec


def tgi_grammar(grammar: Any, settings: ServerSettings) -> GrammarSpec | None:
    """TGI's `grammar`: a JSON schema (`json`, `json_object`; object or JSON text), OpenAI's `json_schema`
    shape ({name, schema}) or a `regex`. `json_object` without a value means any JSON object."""
    if grammar is None:
        return None
    return enabled(settings, _tgi_spec(grammar))


def _tgi_spec(grammar: Any) -> GrammarSpec:
    if not isinstance(grammar, dict) or "type" not in grammar:
        raise ValidationError("`grammar` is {\"type\": \"json\" | \"json_object\" | \"json_schema\" | \"regex\", "
                              "\"value\": ...}")
    kind, value = grammar["type"], grammar.get("value")
    if kind == "regex" and isinstance(value, str):
        spec = GrammarSpec("regex", value)
    elif kind == "json_object" and value in (None, {}, ""):
        spec = GrammarSpec("json_object")
    elif kind in ("json", "json_object") and value is not None:
        spec = GrammarSpec.json_schema(value)
    elif kind == "json_schema" and isinstance(value, dict) and "schema" in value:
        spec = GrammarSpec.json_schema(value["schema"])
    else:
        raise ValidationError(f"`grammar` of type {kind!r} needs a value: a JSON schema for json and json_object, "
                              "{\"schema\": ...} for json_schema, a string for regex")
    return spec


def _response_format(value: dict[str, Any] | None) -> GrammarSpec | None:
    kind = (value or {}).get("type", "text")
    if kind == "text":
        return None
    if "value" in value:  # TGI's chat takes its `grammar` shape here
        return _tgi_spec(value)
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "json_schema":
        schema = (value.get("json_schema") or {}).get("schema")
        if schema is None:
            raise ValidationError("`response_format` of type json_schema needs `json_schema.schema`")
        return GrammarSpec.json_schema(schema)
    raise ValidationError(f"`response_format.type` must be text, json_object or json_schema. Given: {kind!r}")


def _structured_outputs(value: dict[str, Any] | None) -> list[tuple[str, GrammarSpec]]:
    value = value or {}
    found = []
    for key, make in (("json", GrammarSpec.json_schema), ("regex", lambda v: GrammarSpec("regex", v)),
                      ("choice", GrammarSpec.choice), ("grammar", lambda v: GrammarSpec("ebnf", v))):
        if value.get(key) is not None:
            found.append((f"structured_outputs.{key}", make(value[key])))
    if value.get("json_object"):
        found.append(("structured_outputs.json_object", GrammarSpec("json_object")))
    unknown = set(value) - {"json", "regex", "choice", "grammar", "json_object"}
    if unknown:
        raise ValidationError(f"`structured_outputs` takes json, regex, choice, grammar or json_object; "
                              f"not supported: {', '.join(sorted(unknown))}")
    return found


def openai_grammar(body: Any, settings: ServerSettings) -> GrammarSpec | None:
    """The one constraint an OpenAI-route body asks for through any of OpenAI's and vLLM's fields, or None."""
    found = [(f"response_format", spec) for spec in [_response_format(body.response_format)] if spec is not None]
    found += _structured_outputs(body.structured_outputs)
    if body.guided_json is not None:
        found.append(("guided_json", GrammarSpec.json_schema(body.guided_json)))
    if body.guided_regex is not None:
        found.append(("guided_regex", GrammarSpec("regex", body.guided_regex)))
    if body.guided_choice is not None:
        found.append(("guided_choice", GrammarSpec.choice(body.guided_choice)))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", GrammarSpec("ebnf", body.guided_grammar)))
    if len(found) > 1:
        raise ValidationError(f"one structured output per request; given: {', '.join(f'`{n}`' for n, _ in found)}")
    return enabled(settings, found[0][1] if found else None)
