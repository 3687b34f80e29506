"""GGUF checkpoints: config and tokenizer from the metadata, weights dequantized to HF names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType

from tokenmill.interfaces import GGMLWeight
from tokenmill.loader.errors import UnsupportedCheckpointError
from tokenmill.loader.gguf_file import GGUFFile

# GGUF architecture -> transformers model_type and architecture class name.
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
}

# llama.cpp tensor names -> transformers parameter names (per layer after the `blk.N.` prefix).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp's phi3 keeps Phi-3's fused projections: attn_qkv, and ffn_up holding gate and up.
_PHI3_NAMES = {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_architecture(gguf: GGUFFile) -> str:
    arch = gguf.fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedCheckpointError(
            f"{gguf.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    return arch


def config_from_gguf(gguf: GGUFFile) -> Any:
    """A transformers config for the model the GGUF describes."""
    from transformers import AutoConfig

    arch = gguf_architecture(gguf)
    model_type, class_name = ARCHITECTURES[arch]
    f = gguf.fields

    def key(name: str, default: Any = None) -> Any:
        return f.get(f"{arch}.{name}", default)

    num_heads = key("attention.head_count")
    hidden = key("embedding_length")
    vocab_size = key("vocab_size") or len(f["tokenizer.ggml.tokens"])
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=key("attention.head_count_kv", num_heads),
        max_position_embeddings=key("context_length"),
        rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
        rope_theta=key("rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=f.get("tokenizer.ggml.padding_token_id"),
        architectures=[class_name],
    )
    head_dim = key("attention.key_length")
    if head_dim and head_dim != hidden // num_heads:
        kwargs["head_dim"] = head_dim
    if arch == "qwen2":
        kwargs["use_sliding_window"] = False
    if arch == "phi3":
        kwargs["sliding_window"] = key("attention.sliding_window")
    kwargs.update(_rope_scaling(gguf, arch))
    return AutoConfig.for_model(model_type, **kwargs)


def _rope_scaling(gguf: GGUFFile, arch: str) -> dict[str, Any]:
    """Config fields for the RoPE scaling the GGUF carries, as llama.cpp's convert script writes it:
    metadata for linear and yarn, per-frequency tensors for Llama 3.1 (rope_freqs) and longrope."""
    f = gguf.fields
    scaling_type = f.get(f"{arch}.rope.scaling.type", "none")
    original = f.get(f"{arch}.rope.scaling.original_context_length")
    if "rope_factors_long.weight" in gguf.tensors:
        return {"original_max_position_embeddings": original, "rope_scaling": {
            "rope_type": "longrope", "original_max_position_embeddings": original,
            "long_factor": gguf.load("rope_factors_long.weight").tolist(),
            "short_factor": gguf.load("rope_factors_short.weight").tolist()}}
    if "rope_freqs.weight" in gguf.tensors:
        if scaling_type != "none":
            raise UnsupportedCheckpointError(
                f"{gguf.path}: rope_freqs together with RoPE scaling {scaling_type!r} is not supported")
        # Llama 3.1's scaling, kept by llama.cpp only as the factor dividing each frequency.
        return {"rope_freq_factors": gguf.load("rope_freqs.weight").tolist()}
    if scaling_type == "none":
        return {}
    if scaling_type not in ("linear", "yarn"):
        raise UnsupportedCheckpointError(f"{gguf.path}: RoPE scaling {scaling_type!r} is not supported; "
                                         "supported: none, linear, yarn, rope_freqs, longrope")
    scaling = {"rope_type": scaling_type, "factor": float(f[f"{arch}.rope.scaling.factor"])}
    if scaling_type == "yarn":
        scaling["original_max_position_embeddings"] = original
        for name in ("beta_fast", "beta_slow"):
            if f"{arch}.rope.scaling.yarn_{name}" in f:
                scaling[name] = float(f[f"{arch}.rope.scaling.yarn_{name}"])
    return {"rope_scaling": scaling}


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of the rotary halves in Llama q/k rows."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# Read into the config by `config_from_gguf`, not weights.
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _PHI3_NAMES if arch == "phi3" else _LAYER_NAMES
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in names:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{names[part]}.{kind}"
    return None


# Stored as plain floats: nothing for a backend to gain from their bytes.
_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


def tensors_from_gguf(
    gguf: GGUFFile, config: Any, dtype: torch.dtype, progress: Callable[[int], Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, GGMLWeight]]:
    """Every tensor, dequantized and renamed to transformers' names, cast to `dtype`; and the quantized
    2-D weights also as their ggml blocks (rows in the same order), for backends that run them."""
    arch = gguf_architecture(gguf)
    tensors, ggml_weights = {}, {}
    for name in gguf.tensors:
        if name in _ROPE_TENSORS:
            continue
        target = hf_name(name, arch)
        if target is None:
            raise UnsupportedCheckpointError(f"{gguf.path}: unexpected tensor {name!r}")
        info = gguf.tensors[name]
        raw = gguf.raw(name)
        array = gguf.load(name, raw)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
            array, raw = _unpermute(array, heads), _unpermute(raw, heads)
        tensors[target] = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        if len(info.shape) == 2 and info.ggml_type not in _FLOAT_TYPES:
            ggml_weights[target] = GGMLWeight(info.ggml_type.name, torch.from_numpy(np.ascontiguousarray(raw)),
                                              info.shape[1])
        if progress:
            progress(1)
    return tensors, ggml_weights


def tokenizer_from_gguf(path: Path) -> Any:
    """transformers' fast tokenizer for the GGUF, with its chat template and special tokens."""
    try:  # transformers 5: read the tokenizer metadata alone (about 1 s)
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # transformers 4.x: its generic GGUF path
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
