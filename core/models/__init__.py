"""Our model implementations, by the architecture name a transformers config carries."""

from __future__ import annotations

from typing import Any

from tokenmill.errors import TokenmillError
from tokenmill.models.gemma2 import Gemma2ForCausalLM
from tokenmill.models.gemma3 import Gemma3ForCausalLM
from tokenmill.models.granite import GraniteForCausalLM
from tokenmill.models.llama import LlamaForCausalLM, kv_cache_shape
from tokenmill.models.phi import PhiForCausalLM
from tokenmill.models.phi3 import Phi3ForCausalLM
from tokenmill.models.qwen2 import Qwen2ForCausalLM
from tokenmill.models.qwen3 import Qwen3ForCausalLM
from tokenmill.models.starcoder2 import Starcoder2ForCausalLM

MODELS = {
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "GraniteForCausalLM": GraniteForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "PhiForCausalLM": PhiForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Starcoder2ForCausalLM": Starcoder2ForCausalLM,
}

__all__ = ["MODELS", "UnsupportedArchitectureError", "get_model_class", "kv_cache_shape"]


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
