"""Chat messages to prompt text through the model's own chat template (transformers' `apply_chat_template`).

What reaches the template: each message's role, text, `name`, earlier `tool_calls` (their JSON-string
`arguments` parsed, as Hugging Face templates expect objects) and `tool_call_id`; the request's
`documents`, `chat_template_kwargs` and the tools to offer (`tokenmill.api.tools`). A vision-language
model's template gets a message with images as its content parts, each `image_url` part as an `image`
part (where the template writes the model's image placeholder; `tokenmill.api.images` reads the URLs).
Any other part, and an image sent to a text-only model, is refused by name. A template that never
reads `tool_calls` sees an earlier call as the assistant's text, the JSON that TGI's tool prompt asks
for, so the model still knows what it called when the tool's answer follows.

A last message from the assistant is continued (TGI's rule, and vLLM's `continue_final_message`)
unless `continue_final_message` is false, in which case it is a finished turn and a new one starts.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from typing import Any, Sequence

import jinja2
import jinja2.meta

from tokenmill.api.errors import TemplateError
from tokenmill.api.openai_schemas import NO_MULTIMODAL, ChatMessage, ChatRequest
from tokenmill.errors import ValidationError

_JINJA = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])  # as transformers parses templates


def render(body: ChatRequest, tokenizer: Any, tools: Sequence[dict[str, Any]] = (), suffix: str = "",
           images: bool = False) -> str:
    """The prompt text for `body`'s messages, `tools` offered and `suffix` appended to the last message's
    text; or a 422 (ValidationError, or TemplateError from the template). `images`: the model reads images."""
    if not body.messages:
        raise ValidationError("`messages` must contain at least one message")
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template not found")
    continuing = continues_final_message(body)
    calls_as_text = "tool_calls" not in _source(tokenizer, tools)
    messages = [_message(m, i, calls_as_text, images) for i, m in enumerate(body.messages)]
    if isinstance(messages[-1]["content"], list):
        messages[-1]["content"] += [{"type": "text", "text": suffix}] if suffix else []
    else:
        messages[-1]["content"] += suffix
    extra = _template_variables(body.chat_template_kwargs, tokenizer)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, documents=body.documents,
                                             tools=list(tools) or None,
                                             add_generation_prompt=body.add_generation_prompt and not continuing,
                                             continue_final_message=continuing, **extra)
    except Exception as exc:  # noqa: BLE001 - jinja errors of every kind become 422 template_error
        raise TemplateError(str(exc)) from exc


def renders_tools(tokenizer: Any) -> bool:
    """Whether the model's template shows the model a `tools` variable (TGI asks the same of its template)."""
    return getattr(tokenizer, "chat_template", None) is not None and "tools" in _variables(_source(tokenizer, [{}]))


def _source(tokenizer: Any, tools: Sequence[dict[str, Any]]) -> str:
    """The template text apply_chat_template would use: a tokenizer may hold several, one for tool use."""
    try:
        return tokenizer.get_chat_template(None, list(tools) or None)
    except Exception:  # noqa: BLE001 - no template fits: render() answers with the template error
        return ""


@functools.lru_cache(maxsize=16)
def _variables(source: str) -> frozenset[str]:
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(_JINJA.parse(source)))
    except jinja2.TemplateSyntaxError:  # a tag transformers adds (`{% generation %}`): look for the name
        return frozenset(re.findall(r"\w+", source))


def continues_final_message(body: ChatRequest) -> bool:
    last_is_assistant = body.messages[-1].role == "assistant"
    if body.continue_final_message is None:
        return last_is_assistant
    if body.continue_final_message and not last_is_assistant:
        raise ValidationError("`continue_final_message` needs a last message from the assistant to continue; "
                              f"the last message is the {body.messages[-1].role}'s")
    if body.continue_final_message and body.add_generation_prompt and "add_generation_prompt" in body.model_fields_set:
        raise ValidationError("`continue_final_message` and `add_generation_prompt` cannot both be true")
    return body.continue_final_message


def _message(message: ChatMessage, index: int, calls_as_text: bool, images: bool) -> dict[str, Any]:
    with_images = images and isinstance(message.content, list) and any(_is_image(p) for p in message.content)
    content = _parts_with_images(message, index) if with_images else message_text(message, index)
    out: dict[str, Any] = {"role": message.role, "content": content}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [_tool_call(call) for call in message.tool_calls]
        if calls_as_text and not out["content"]:
            out["content"] = "\n".join(json.dumps(_as_prompted(call), ensure_ascii=False) for call in out["tool_calls"])
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def message_text(message: ChatMessage, index: int) -> str:
    """A message's text: its content, or its text parts joined; any other part is refused, naming it."""
    if not isinstance(message.content, list):
        return message.content or ""
    texts = []
    for j, part in enumerate(message.content):
        kind = part.get("type")
        if kind == "image_url":
            raise ValidationError(f"`messages[{index}].content[{j}]` is not supported: content parts of type "
                                  "`image_url` need a vision-language model, and this model is text-only")
        if kind != "text":
            raise ValidationError(f"`messages[{index}].content[{j}]` is not supported: content parts of type "
                                  f"`{kind}` need a multimodal model, and {NO_MULTIMODAL}")
        texts.append(part.get("text") or "")
    return "".join(texts)


def _is_image(part: dict[str, Any]) -> bool:
    return part.get("type") == "image_url"


def _parts_with_images(message: ChatMessage, index: int) -> list[dict[str, Any]]:
    """A message's content parts as a vision-language template reads them: text, and `image` parts."""
    parts = []
    for j, part in enumerate(message.content):
        if _is_image(part):
            parts.append({"type": "image"})
        elif part.get("type") == "text":
            parts.append({"type": "text", "text": part.get("text") or ""})
        else:
            raise ValidationError(f"`messages[{index}].content[{j}]` is not supported: content parts of type "
                                  f"`{part.get('type')}` are not read, {NO_MULTIMODAL}")
    return parts


def image_urls(body: ChatRequest) -> list[tuple[str, str]]:
    """The (url, where) of every image part of the messages, in prompt order."""
    urls = []
    for i, message in enumerate(body.messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
            if _is_image(part):
                url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
                if not isinstance(url, str):
                    raise ValidationError(f"`messages[{i}].content[{j}].image_url.url` must be a URL string")
                urls.append((url, f"`messages[{i}].content[{j}]`"))
    return urls


def _as_prompted(call: dict[str, Any]) -> dict[str, Any]:
    """An earlier call in the shape TGI's tool prompt asks the model to write: {name, parameters}."""
    function = call.get("function") or {}
    return {"name": function.get("name"), "parameters": function.get("arguments")}


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call  # not JSON: the template gets the string as sent
    return {**call, "function": {**function, "arguments": arguments}}


def _template_variables(kwargs: dict[str, Any] | None, tokenizer: Any) -> dict[str, Any]:
    """`chat_template_kwargs` as template variables; a name that is an argument of the template call
    itself (such as `tokenize`) would change the call, not the template, and is refused."""
    if not kwargs:
        return {}
    reserved = {name for name, p in inspect.signature(tokenizer.apply_chat_template).parameters.items()
                if p.kind is not inspect.Parameter.VAR_KEYWORD} | {"messages"}
    for name in kwargs:
        if name in reserved:
            raise ValidationError(f"`chat_template_kwargs.{name}` is not supported: it is an argument of the "
                                  "template call, not a template variable")
    return kwargs
