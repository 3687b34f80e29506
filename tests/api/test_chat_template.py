"""What of a chat request reaches the model's chat template, and what is refused before it."""

from __future__ import annotations

import pytest

from tests.tiny_models import tiny_tokenizer
from tokenmill.api.chat_template import render, renders_tools
from tokenmill.api.errors import TemplateError
from tokenmill.api.openai_schemas import ChatRequest
from tokenmill.errors import ValidationError

TEMPLATE = (
    "{% for d in documents or [] %}[doc {{ d.title }}]{% endfor %}"
    "{% if mood is defined %}[mood {{ mood }}]{% endif %}"
    "{% for m in messages %}<{{ m.role }}{% if m.name %} {{ m.name }}{% endif %}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}"
    "{% if m.tool_call_id %}[for {{ m.tool_call_id }}]{% endif %}</>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def _render(tokenizer, messages, **body) -> str:
    return render(ChatRequest(messages=messages, **body), tokenizer)


def test_tool_calls_names_and_tool_results_reach_the_template(tokenizer) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    text = _render(tokenizer, [{"role": "user", "name": "ann", "content": "w5"},
                               {"role": "assistant", "content": None, "tool_calls": [call]},
                               {"role": "tool", "tool_call_id": "c1", "content": "w6"}])
    # The JSON-string arguments arrive as an object, as Hugging Face templates expect.
    assert text == "<user ann>w5</><assistant>[call weather Oslo]</><tool>w6[for c1]</><assistant>"


def test_a_template_that_never_reads_tool_calls_sees_earlier_calls_as_text() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    text = _render(tokenizer, [{"role": "user", "content": "w5"},
                               {"role": "assistant", "content": None, "tool_calls": [call]},
                               {"role": "tool", "tool_call_id": "c1", "content": "w6"}])
    # As TGI's tool prompt asks the model to write a call: {name, parameters}.
    assert text == '<user>w5<assistant>{"name": "weather", "parameters": {"city": "Oslo"}}<tool>w6'
    assert not renders_tools(tokenizer)


@pytest.mark.parametrize("template", [
    "{% if tools %}[{{ tools | length }} tools]{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}",
    # transformers' {% generation %} tag is no jinja: the variable is found in the text.
    "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}{{ tools }}",
])
def test_tools_reach_a_template_that_reads_them_and_a_suffix_ends_the_last_message(template) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    assert renders_tools(tokenizer)
    body = ChatRequest(messages=[{"role": "user", "content": "w5"}])
    text = render(body, tokenizer, [{"type": "function", "function": {"name": "f"}}], suffix=" w6")
    assert "w5 w6" in text and ("[1 tools]" in text or "'name': 'f'" in text)


def test_documents_and_chat_template_kwargs_are_template_variables(tokenizer) -> None:
    text = _render(tokenizer, [{"role": "user", "content": "w5"}], documents=[{"title": "a", "text": "w7"}],
                   chat_template_kwargs={"mood": "calm"})
    assert text.startswith("[doc a][mood calm]<user>")


@pytest.mark.parametrize("name", ["tokenize", "add_generation_prompt", "messages", "return_dict"])
def test_a_chat_template_kwarg_that_is_an_argument_of_the_call_is_refused(tokenizer, name) -> None:
    with pytest.raises(ValidationError, match=f"`chat_template_kwargs.{name}`"):
        _render(tokenizer, [{"role": "user", "content": "w5"}], chat_template_kwargs={name: True})


def test_a_final_assistant_message_is_continued_by_default(tokenizer) -> None:
    turns = [{"role": "user", "content": "w5"}, {"role": "assistant", "content": "w8 w9"}]
    assert _render(tokenizer, turns) == "<user>w5</><assistant>w8 w9"
    assert _render(tokenizer, turns, continue_final_message=False) == "<user>w5</><assistant>w8 w9</><assistant>"
    assert _render(tokenizer, turns, continue_final_message=False, add_generation_prompt=False).endswith("w9</>")
    with pytest.raises(ValidationError, match="cannot both be true"):
        _render(tokenizer, turns, continue_final_message=True, add_generation_prompt=True)


def test_text_parts_are_joined_and_other_parts_refused_by_name(tokenizer) -> None:
    parts = [{"type": "text", "text": "w5 "}, {"type": "text", "text": "w6"}]
    assert _render(tokenizer, [{"role": "user", "content": parts}]) == "<user>w5 w6</><assistant>"
    with pytest.raises(ValidationError, match=r"`messages\[0\].content\[1\]`.*`image_url`"):
        _render(tokenizer, [{"role": "user", "content": [parts[0], {"type": "image_url", "image_url": {"url": "x"}}]}])


def test_no_template_is_tgis_template_error() -> None:
    with pytest.raises(TemplateError, match="template not found"):
        render(ChatRequest(messages=[{"role": "user", "content": "w5"}]), tiny_tokenizer())
