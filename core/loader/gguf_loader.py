"""GGUF checkpoints: config from the metadata, weights dequantized to HF names (the tokenizer: `gguf_tokenizer`)."""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType

from tokenmill.interfaces import GGMLWeight
from tokenmill.loader.errors import UnsupportedCheckpointError
from tokenmill.loader.gguf_file import GGUFFile
from tokenmill.loader.gguf_families import GGUFFamily, gguf_family

_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


# Fields whose None the GGUF means (no window, no such token), not "absent".
_NONE_MEANS_NONE = {"sliding_window", "pad_token_id", "bos_token_id", "eos_token_id"}


def config_from_gguf(gguf: GGUFFile) -> Any:
    """A transformers config for the model the GGUF describes."""
    from transformers import AutoConfig

    arch, family = gguf_family(gguf)
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
        architectures=[family.class_name],
    )
    head_dim = key("attention.key_length")
    if head_dim and head_dim != hidden // num_heads:
        kwargs["head_dim"] = head_dim
    kwargs.update(_rope_scaling(gguf, arch))
    kwargs.update(family.config(gguf, key, kwargs))
    # A field the GGUF lacks keeps the config class's default.
    kwargs = {name: value for name, value in kwargs.items() if value is not None or name in _NONE_MEANS_NONE}
    return AutoConfig.for_model(family.model_type, **kwargs)


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


def hf_name(gguf_name: str, family: GGUFFamily) -> str | None:
    """The transformers name of GGUF tensor `gguf_name`; for stacked experts, a pattern with `{expert}`."""
    if gguf_name in family.global_names:
        return family.global_names[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in family.layer_names:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{family.layer_names[part]}.{kind}"
    return None


# Stored as plain floats: nothing for a backend to gain from their bytes.
_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
_PERMUTED = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")


def _undo_convert(name: str, array: np.ndarray, raw: np.ndarray, family: GGUFFamily,
                  config: Any) -> tuple[np.ndarray, np.ndarray]:
    """The tensor as transformers holds it, from what convert_hf_to_gguf.py wrote (and its bytes, rows in
    the same order)."""
    if family.permuted_qk and name.endswith(_PERMUTED):
        heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
        array = _unpermute(array, heads)
        raw = _unpermute(raw, heads) if array.ndim == 2 else raw
    if family.norm_offset and name.endswith("norm.weight"):
        array = array - family.norm_offset
    if name.endswith("ffn_gate_inp_shexp.weight"):  # a vector to llama.cpp, a 1-row linear to transformers
        array = array.reshape(1, -1)
    return array, raw


def tensors_from_gguf(
    gguf: GGUFFile, config: Any, dtype: torch.dtype, progress: Callable[[int], Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, GGMLWeight]]:
    """Every tensor, dequantized and renamed to transformers' names, cast to `dtype`; and the quantized
    2-D weights also as their ggml blocks (rows in the same order), for backends that run them. Stacked
    expert tensors (3-D) come back per expert and dequantized only: the block path is for linear layers."""
    _, family = gguf_family(gguf)
    tensors, ggml_weights = {}, {}
    for name in gguf.tensors:
        if name in _ROPE_TENSORS:
            continue
        target = hf_name(name, family)
        if target is None:
            raise UnsupportedCheckpointError(f"{gguf.path}: unexpected tensor {name!r}")
        info = gguf.tensors[name]
        raw = gguf.raw(name)
        array, raw = _undo_convert(name, gguf.load(name, raw), raw, family, config)
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        if "{expert}" in target:
            tensors.update((target.format(expert=expert), tensor[expert]) for expert in range(tensor.shape[0]))
        else:
            tensors[target] = tensor
            if len(info.shape) == 2 and info.ggml_type not in _FLOAT_TYPES:
                ggml_weights[target] = GGMLWeight(info.ggml_type.name, torch.from_numpy(np.ascontiguousarray(raw)),
                                                  info.shape[1])
        if progress:
            progress(1)
    return tensors, ggml_weights
