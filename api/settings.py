"""The router's limits and identity: TGI's launcher flags, as one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerSettings:
    model_id: str
    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    payload_limit: int = 2_000_000  # bytes
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = field(default_factory=tuple)
    compute_type: str = "cpu"
    version: str = "0.1.0"
    watermark_gamma: float = 0.5  # the `watermark` parameter's settings (TGI's --watermark-gamma/-delta)
    watermark_delta: float = 2.0
    adapters: tuple[str, ...] = ()  # the LoRA adapters requests may name (`adapter_id`, OpenAI's `model`)
    disable_grammar_support: bool = False  # TGI's flag: structured output requests get 422
    tool_call_parser: str = "hermes"  # vLLM's flag: how `tool_choice: auto` finds calls in the text (api/tool_parsers)
    model_implementation: str = "tokenmill"  # whose code runs the model: tokenmill, transformers (fallback), backend

    def __post_init__(self) -> None:
        if not 0 < self.max_input_tokens < self.max_total_tokens:
            raise ValueError(f"--max-input-tokens ({self.max_input_tokens}) must be positive and smaller than "
                             f"--max-total-tokens ({self.max_total_tokens})")
