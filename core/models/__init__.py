"""Our model implementations, by the architecture name a transformers config carries."""

from __future__ import annotations

from typing import Any

from tokenmill.errors import TokenmillError
from tokenmill.models.idefics3 import Idefics3ForConditionalGeneration
from tokenmill.models.llama import LlamaForCausalLM, kv_cache_shape
from tokenmill.models.phi3 import Phi3ForCausalLM
from tokenmill.models.qwen2 import Qwen2ForCausalLM
from tokenmill.models.qwen3 import Qwen3ForCausalLM

MODELS = {
    "Idefics3ForConditionalGeneration": Idefics3ForConditionalGeneration,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}

__all__ = ["MODELS", "UnsupportedArchitectureError", "get_model_class", "kv_cache_shape", "text_config_of"]


class UnsupportedArchitectureError(TokenmillError, ValueError):
    """The checkpoint's architecture has no implementation in tokenmill."""


def get_model_class(config: Any) -> type:
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        if name in MODELS:
            return MODELS[name]
    raise UnsupportedArchitectureError(
        f"architecture {', '.join(architectures) or '(none given)'} is not supported; "
        f"supported: {', '.join(sorted(MODELS))}"
    )


def text_config_of(config: Any) -> Any:
    """The language model's config: a vision-language config's `text_config`, else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config
