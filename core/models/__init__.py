"""Our model implementations, by the architecture name a transformers config carries; any other causal LM
transformers can run on our paged cache takes the transformers fallback (`transformers_fallback`)."""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.errors import TokenmillError
from tokenmill.interfaces import KVCacheShape
from tokenmill.models import llama, transformers_fallback
from tokenmill.models.gemma2 import Gemma2ForCausalLM
from tokenmill.models.gemma3 import Gemma3ForCausalLM
from tokenmill.models.granite import GraniteForCausalLM
from tokenmill.models.idefics3 import Idefics3ForConditionalGeneration
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.mixtral import MixtralForCausalLM
from tokenmill.models.phi import PhiForCausalLM
from tokenmill.models.phi3 import Phi3ForCausalLM
from tokenmill.models.qwen2 import Qwen2ForCausalLM
from tokenmill.models.qwen2_moe import Qwen2MoeForCausalLM
from tokenmill.models.qwen3 import Qwen3ForCausalLM
from tokenmill.models.qwen3_moe import Qwen3MoeForCausalLM
from tokenmill.models.starcoder2 import Starcoder2ForCausalLM
from tokenmill.models.transformers_fallback import TransformersCausalLM
from tokenmill.parallel import SINGLE_RANK, ParallelContext

MODELS = {
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "GraniteForCausalLM": GraniteForCausalLM,
    "Idefics3ForConditionalGeneration": Idefics3ForConditionalGeneration,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "PhiForCausalLM": PhiForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Starcoder2ForCausalLM": Starcoder2ForCausalLM,
}

__all__ = ["MODELS", "UnsupportedArchitectureError", "get_model_class", "kv_cache_shape", "model_implementation",
           "text_config_of"]


class UnsupportedArchitectureError(TokenmillError, ValueError):
    """The checkpoint's architecture has no implementation in tokenmill, and the transformers fallback cannot run it."""


def _own_class(config: Any) -> type | None:
    for name in getattr(config, "architectures", None) or []:
        if name in MODELS:
            return MODELS[name]
    return None


def get_model_class(config: Any) -> type:
    """Our class for the config's architecture, else `TransformersCausalLM` where the fallback can run it."""
    own = _own_class(config)
    if own is not None:
        return own
    try:
        transformers_fallback.probe_attention(config)
    except UnsupportedArchitectureError as exc:
        architectures = getattr(config, "architectures", None) or []
        raise UnsupportedArchitectureError(
            f"architecture {', '.join(architectures) or '(none given)'} is not supported: tokenmill implements "
            f"{', '.join(sorted(MODELS))}, and {exc}"
        ) from None
    return TransformersCausalLM


def model_implementation(model_class: type) -> str:
    """Whose modeling code runs the model: "tokenmill" (ours) or "transformers" (the fallback)."""
    return getattr(model_class, "implementation", "tokenmill")


def kv_cache_shape(config: Any, dtype: torch.dtype, parallel: ParallelContext = SINGLE_RANK) -> KVCacheShape:
    """What each rank caches per token and layer for the model `get_model_class` picks."""
    if _own_class(config) is None:
        return transformers_fallback.kv_cache_shape(config, dtype, parallel)
    return llama.kv_cache_shape(text_config_of(config), dtype, parallel)


def text_config_of(config: Any) -> Any:
    """The language model's config: a vision-language config's `text_config`, else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config
