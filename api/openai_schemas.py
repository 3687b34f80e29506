"""Request bodies of the OpenAI-compatible routes: OpenAI's fields, TGI's and vLLM's extensions.

Each model says which fields it honours and which it refuses (`tokenmill.api.schemas.RequestBody`). The
fields are the union of OpenAI's API reference, TGI's `ChatRequest`/`CompletionRequest` and vLLM's
OpenAI server, so a client of any of the three gets an answer that does what it asked or says why not.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from tokenmill.api.schemas import Refusal, RequestBody

NO_LEGACY_FUNCTIONS = "OpenAI's deprecated functions API is not implemented; send `tools` and `tool_choice`"
NO_MULTIMODAL = "tokenmill reads text, and images where the model is a vision-language one: no other modality"


class StreamOptions(RequestBody):
    honoured: ClassVar[frozenset[str]] = frozenset({"include_usage", "continuous_usage_stats"})

    include_usage: bool = False  # a last chunk with `choices: []` and the usage
    continuous_usage_stats: bool = False  # vLLM's: the usage so far in every chunk


# Fields both routes share, refused: vLLM's sampling and serving extensions this server has no
# counterpart for, the parts of structured output it does not offer, and OpenAI's platform features.
_COMMON_REFUSED: dict[str, Refusal] = {
    "best_of": Refusal("generating more sequences than are returned is not implemented", accepted=(1,)),
    "use_beam_search": Refusal("beam search is not implemented"),
    "length_penalty": Refusal("it applies to beam search, which is not implemented"),
    "allowed_token_ids": Refusal("restricting the vocabulary is not implemented; `logit_bias` can ban tokens"),
    "bad_words": Refusal("banning words is not implemented; `logit_bias` can ban tokens"),
    "spaces_between_special_tokens": Refusal("special tokens are always decoded with spaces between them"),
    "prompt_logprobs": Refusal("prompt logprobs are returned by TGI's /generate (`decoder_input_details`) only"),
    "logits_processors": Refusal("custom logits processors cannot be loaded"),
    "return_tokens_as_token_ids": Refusal("tokens are always returned as text", accepted=(False,)),
    "return_token_ids": Refusal("token ids are returned by TGI's /generate (`details`) only", accepted=(False,)),
    "cache_salt": Refusal("the prefix cache cannot be salted per request"),
    "kv_transfer_params": Refusal("disaggregated serving is not implemented"),
    "vllm_xargs": Refusal("there are no request extensions to pass them to"),
    "priority": Refusal("requests are served first come, first served"),
    "guided_decoding_backend": Refusal("grammars are compiled by xgrammar; no other library can be chosen",
                                       accepted=("xgrammar", "auto")),
    "guided_whitespace_pattern": Refusal("JSON is generated without free whitespace; no pattern can be set"),
    "structural_tag": Refusal("structural tags are not implemented; `tools` with `tool_choice` required or named "
                              "constrain tool calls"),
    "metadata": Refusal("completions are not stored"),
    "store": Refusal("completions are not stored", accepted=(False,)),
    "service_tier": Refusal("there is one service tier", accepted=("auto", "default")),
}


class _Common(RequestBody):
    honoured: ClassVar[frozenset[str]] = frozenset({
        "model", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options", "seed",
        "frequency_penalty", "presence_penalty", "repetition_penalty", "ignore_eos", "top_k", "min_p", "min_tokens",
        "stop_token_ids", "logit_bias", "skip_special_tokens", "include_stop_str_in_output", "user",
        "truncate_prompt_tokens", "request_id",
        # Structured output (issue #18): tokenmill.api.structured.
        "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    })
    refused: ClassVar[dict[str, Refusal]] = _COMMON_REFUSED

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None  # recorded on the request's trace span, as OpenAI uses it: to tell end users apart
    # vLLM's sampling extensions.
    repetition_penalty: float | None = Field(None, gt=0.0)
    top_k: int | None = Field(None, ge=-1)  # -1 and 0: off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False  # which benchmarks and load tools send to get a fixed number of tokens
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # keep the last N prompt tokens; -1: as many as fit
    request_id: str | None = None  # the response's id is built from it
    response_format: dict[str, Any] | None = None  # OpenAI's: {"type": "text" | "json_object" | "json_schema"}
    structured_outputs: dict[str, Any] | None = None  # vLLM's: one of json, regex, choice, grammar, json_object
    guided_json: Any = None  # vLLM's older fields, one constraint each
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Refused (see _COMMON_REFUSED).
    best_of: int | None = Field(None, ge=1)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = None
    logits_processors: list[Any] | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    priority: int = 0
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structural_tag: Any = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None


class ChatMessage(RequestBody):
    honoured: ClassVar[frozenset[str]] = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})

    role: str
    content: str | list[dict[str, Any]] | None = None  # text parts, and image_url parts for a vision-language model
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # earlier calls, passed to the chat template
    tool_call_id: str | None = None


class FunctionDefinition(RequestBody):
    honoured: ClassVar[frozenset[str]] = frozenset({"name", "description", "parameters"})

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments; none: the function takes none


class Tool(RequestBody):
    """One entry of `tools`: OpenAI's {"type": "function", "function": {...}}; TGI takes the same shape."""

    honoured: ClassVar[frozenset[str]] = frozenset({"type", "function"})

    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatRequest(_Common):
    honoured: ClassVar[frozenset[str]] = _Common.honoured | {
        "messages", "logprobs", "top_logprobs", "max_completion_tokens", "echo", "add_generation_prompt",
        "continue_final_message", "chat_template_kwargs", "documents", "add_special_tokens",
        # Tool calling (issue #18): tokenmill.api.tools.
        "tools", "tool_choice", "tool_prompt", "parallel_tool_calls",
    }
    refused: ClassVar[dict[str, Refusal]] = {
        **_COMMON_REFUSED,
        "functions": Refusal(NO_LEGACY_FUNCTIONS, error_type="tool_error"),
        "function_call": Refusal(NO_LEGACY_FUNCTIONS, accepted=("none",), error_type="tool_error"),
        "chat_template": Refusal("the model's own chat template is used; a request cannot replace it"),
        "mm_processor_kwargs": Refusal(NO_MULTIMODAL),
        "audio": Refusal(NO_MULTIMODAL),
        "modalities": Refusal(NO_MULTIMODAL, accepted=(["text"],)),
        "prediction": Refusal("predicted outputs are not implemented"),
        "reasoning_effort": Refusal("the model's reasoning cannot be steered; use `chat_template_kwargs` where its "
                                    "template takes such a variable"),
        "include_reasoning": Refusal("reasoning is not separated from the answer", accepted=(True,)),
        "web_search_options": Refusal("there is no web search"),
        "verbosity": Refusal("the model's verbosity cannot be steered"),
    }

    messages: list[ChatMessage]
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=1)
    echo: bool = False  # vLLM's: the answer starts with the last message's content when it is the assistant's
    add_generation_prompt: bool = True
    # vLLM's; None: TGI's rule, continue a last message that is the assistant's.
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the chat template
    documents: list[dict[str, Any]] | None = None  # for templates that render retrieved documents
    add_special_tokens: bool = False  # the chat template already holds the special tokens
    tools: list[Tool] | None = None
    # "none" | "auto" | "required" | {"type": "function", "function": {"name"}} | a bare name (TGI's); None: auto
    tool_choice: str | dict[str, Any] | None = None
    tool_prompt: str | None = None  # TGI's: appended to the last message when tools are rendered
    parallel_tool_calls: bool = True  # OpenAI's default: the model may call several tools in one turn
    # Refused (see `refused`).
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    chat_template: str | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool = True
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None


class CompletionRequest(_Common):
    honoured: ClassVar[frozenset[str]] = _Common.honoured | {"prompt", "echo", "logprobs", "add_special_tokens"}
    refused: ClassVar[dict[str, Refusal]] = {
        **_COMMON_REFUSED,
        # TGI's own words and error type.
        "suffix": Refusal("", message="Suffix is not supported and can be achieved by preprocessing the prompt.",
                          error_type="suffix not supported"),
        "prompt_embeds": Refusal("prompts are text"),
    }

    prompt: str | list[str]
    echo: bool = False  # the prompt before the completion (with its logprobs when `logprobs` is set)
    logprobs: int | None = Field(None, ge=0)  # the chosen tokens' logprobs and this many alternatives
    add_special_tokens: bool = True
    # Refused (see `refused`).
    suffix: str | None = None
    prompt_embeds: Any = None
