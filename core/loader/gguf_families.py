"""What each GGUF architecture llama.cpp writes means in transformers' terms: the config class, the
tensor names, the config fields its metadata (or only its tensors) carry, and what convert_hf_to_gguf.py
did to the weights that loading must undo."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from tokenmill.loader.errors import UnsupportedCheckpointError
from tokenmill.loader.gguf_file import GGUFFile

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
# Mixtures of experts: the router, and each expert's weights stacked over experts in one 3-D tensor, given
# back per expert (`{expert}`) under the names the MoE models load.
_MOE_NAMES = {
    **_LAYER_NAMES,
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{expert}.gate_proj",
    "ffn_up_exps": "mlp.experts.{expert}.up_proj",
    "ffn_down_exps": "mlp.experts.{expert}.down_proj",
    # convert --fuse-gate-up-exps: gate rows then up rows per expert, transformers 5's stacked layout.
    "ffn_gate_up_exps": "mlp.experts.gate_up_proj",
}
# Qwen2-MoE's shared expert and its sigmoid gate.
_SHARED_EXPERT_NAMES = {
    **_MOE_NAMES,
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# llama.cpp's phi3 keeps Phi-3's fused projections: attn_qkv, and ffn_up holding gate and up.
_PHI3_NAMES = {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# Gemma's four norms a layer: ffn_norm is the one before the MLP.
_GEMMA_NAMES = {**_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_STARCODER2_NAMES = {**_LAYER_NAMES, "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_PHI2_NAMES = {**_LAYER_NAMES, "attn_output": "self_attn.dense", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output_norm.bias": "model.norm.bias",
    "output.weight": "lm_head.weight",
    "output.bias": "lm_head.bias",
}
_PHI2_GLOBAL_NAMES = {**_GLOBAL_NAMES, "output_norm.weight": "model.final_layernorm.weight",
                      "output_norm.bias": "model.final_layernorm.bias"}

# Metadata reader for one architecture: key("attention.head_count") reads "<arch>.attention.head_count".
Key = Callable[..., Any]


@dataclass(frozen=True)
class GGUFFamily:
    """One GGUF architecture as transformers knows it."""

    model_type: str
    class_name: str
    layer_names: dict[str, str] = field(default_factory=lambda: _LAYER_NAMES)
    global_names: dict[str, str] = field(default_factory=lambda: _GLOBAL_NAMES)
    # Family-specific config fields: (gguf, key, the common kwargs) -> fields to add or replace (Gemma 3 also
    # takes rope_theta and rope_scaling out of the common kwargs, into its per-layer-type rope_parameters).
    config: Callable[[GGUFFile, Key, dict[str, Any]], dict[str, Any]] = lambda gguf, key, kwargs: {}
    # llama.cpp's llama graph rotates interleaved pairs, so convert permutes the q/k rows (and biases).
    permuted_qk: bool = False
    # Gemma's norms scale by (1 + weight); convert stores 1 + weight, which loading takes back off.
    norm_offset: float = 0.0


def _has(gguf: GGUFFile, layer_tensor: str) -> bool:
    return f"blk.0.{layer_tensor}" in gguf.tensors


def _gemma_attention(gguf: GGUFFile, key: Key, kwargs: dict[str, Any], layers_of_27b: int) -> dict[str, Any]:
    """Gemma's head size and query scale. GGUF keeps no query_pre_attn_scalar: llama.cpp scales by the
    head size, except for the 27B model (known by its layer count), which scales by hidden / heads."""
    head_dim = key("attention.key_length")
    is_27b = kwargs["num_hidden_layers"] == layers_of_27b
    fields = {"head_dim": head_dim,
              "query_pre_attn_scalar": kwargs["hidden_size"] // kwargs["num_attention_heads"] if is_27b else head_dim}
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if key(name) is not None:  # absent: transformers' defaults, which are llama.cpp's
            fields[name] = key(name)
    return fields


def _gemma2(gguf: GGUFFile, key: Key, kwargs: dict[str, Any]) -> dict[str, Any]:
    # Layers alternate sliding and global, sliding first: transformers' default layer_types, llama.cpp's rule.
    return {**_gemma_attention(gguf, key, kwargs, 46), "sliding_window": key("attention.sliding_window")}


def _gemma3(gguf: GGUFFile, key: Key, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Five sliding layers to a global one (llama.cpp's fixed pattern, and transformers' default); the
    sliding layers' RoPE has llama.cpp's fixed base 10000 and no scaling, the global ones' the metadata's."""
    fields = _gemma3_rope(kwargs)
    window = key("attention.sliding_window")
    if window:
        fields["sliding_window"] = window
    else:  # written without a window: every layer global
        fields["layer_types"] = ["full_attention"] * kwargs["num_hidden_layers"]
    return {**_gemma_attention(gguf, key, kwargs, 62), **fields}


def _gemma3_rope(kwargs: dict[str, Any]) -> dict[str, Any]:
    scaling = kwargs.pop("rope_scaling", None) or {"rope_type": "default"}
    if scaling["rope_type"] not in ("default", "linear"):
        raise UnsupportedCheckpointError(f"gemma3 GGUF with RoPE scaling {scaling['rope_type']!r} is not supported")
    full = {**scaling, "rope_theta": kwargs.pop("rope_theta")}
    return {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": full}}


def _qwen_moe(gguf: GGUFFile, key: Key, norm_topk_prob: bool) -> dict[str, Any]:
    """Every layer sparse: llama.cpp's qwen2moe/qwen3moe have no tensors for a dense MLP. Whether routing
    weights are renormalized is expert_weights_norm where convert writes it, else llama.cpp's rule for the
    family (qwen2moe: no, qwen3moe: yes)."""
    norm = key("expert_weights_norm")
    return {"num_experts_per_tok": key("expert_used_count"), "num_experts": key("expert_count"),
            "norm_topk_prob": norm_topk_prob if norm is None else bool(norm),
            "moe_intermediate_size": key("expert_feed_forward_length"), "decoder_sparse_step": 1,
            "mlp_only_layers": []}


def _qwen2moe(gguf: GGUFFile, key: Key, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**_qwen_moe(gguf, key, False), "use_sliding_window": False,
            "shared_expert_intermediate_size": key("expert_shared_feed_forward_length")}


def _qwen3moe(gguf: GGUFFile, key: Key, kwargs: dict[str, Any]) -> dict[str, Any]:
    return _qwen_moe(gguf, key, True)


def _mixtral(gguf: GGUFFile, key: Key, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"num_local_experts": key("expert_count"), "num_experts_per_tok": key("expert_used_count"),
            "sliding_window": None}


def _starcoder2(gguf: GGUFFile, key: Key, kwargs: dict[str, Any]) -> dict[str, Any]:
    # llama.cpp runs StarCoder2 without a sliding window and convert writes none.
    return {"norm_epsilon": key("attention.layer_norm_epsilon"), "use_bias": _has(gguf, "attn_q.bias"),
            "sliding_window": None}


def _phi2(gguf: GGUFFile, key: Key, kwargs: dict[str, Any]) -> dict[str, Any]:
    # convert writes feed_forward_length as 4 * hidden whatever the model's is: the MLP's own rows tell.
    head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    return {"layer_norm_eps": key("attention.layer_norm_epsilon"),
            "intermediate_size": gguf.tensors["blk.0.ffn_up.weight"].shape[0],
            "partial_rotary_factor": key("rope.dimension_count", head_dim) / head_dim}


def _granite(gguf: GGUFFile, key: Key, kwargs: dict[str, Any]) -> dict[str, Any]:
    multipliers = {"attention_multiplier": "attention.scale", "embedding_multiplier": "embedding_scale",
                   "residual_multiplier": "residual_scale", "logits_scaling": "logit_scale"}
    fields = {name: key(gguf_key) for name, gguf_key in multipliers.items() if key(gguf_key) is not None}
    return {**fields, "attention_bias": _has(gguf, "attn_q.bias"), "mlp_bias": _has(gguf, "ffn_up.bias")}


FAMILIES = {
    "llama": GGUFFamily("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": GGUFFamily("qwen2", "Qwen2ForCausalLM", config=lambda gguf, key, kwargs: {"use_sliding_window": False}),
    "qwen3": GGUFFamily("qwen3", "Qwen3ForCausalLM"),
    "phi3": GGUFFamily("phi3", "Phi3ForCausalLM", _PHI3_NAMES,
                       config=lambda gguf, key, kwargs: {"sliding_window": key("attention.sliding_window")}),
    "gemma2": GGUFFamily("gemma2", "Gemma2ForCausalLM", _GEMMA_NAMES, config=_gemma2, norm_offset=1.0),
    "gemma3": GGUFFamily("gemma3_text", "Gemma3ForCausalLM", _GEMMA_NAMES, config=_gemma3, norm_offset=1.0),
    "qwen2moe": GGUFFamily("qwen2_moe", "Qwen2MoeForCausalLM", _SHARED_EXPERT_NAMES, config=_qwen2moe),
    "qwen3moe": GGUFFamily("qwen3_moe", "Qwen3MoeForCausalLM", _MOE_NAMES, config=_qwen3moe),
    "starcoder2": GGUFFamily("starcoder2", "Starcoder2ForCausalLM", _STARCODER2_NAMES, config=_starcoder2),
    "phi2": GGUFFamily("phi", "PhiForCausalLM", _PHI2_NAMES, _PHI2_GLOBAL_NAMES, config=_phi2),
    "granite": GGUFFamily("granite", "GraniteForCausalLM", config=_granite, permuted_qk=True),
}
# Mixtral is written as llama with stacked experts (and llama.expert_count).
MIXTRAL = GGUFFamily("mixtral", "MixtralForCausalLM", _MOE_NAMES, config=_mixtral, permuted_qk=True)


def gguf_family(gguf: GGUFFile) -> tuple[str, GGUFFamily]:
    """The GGUF's architecture name (its metadata keys' prefix) and what it means in transformers' terms."""
    arch = gguf.fields.get("general.architecture")
    if arch not in FAMILIES:
        raise UnsupportedCheckpointError(
            f"{gguf.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    if arch == "llama" and gguf.fields.get("llama.expert_count"):
        return arch, MIXTRAL
    return arch, FAMILIES[arch]
