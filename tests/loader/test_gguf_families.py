"""GGUF files of every family llama.cpp writes and tokenmill runs, written here from tiny random models
the way llama.cpp's convert_hf_to_gguf.py writes them (gguf-py's tensor names and metadata, llama-arch
q/k rows permuted, Llama 3.1's scaling as rope_freqs): each loads and its greedy tokens equal
transformers' on the model it was written from, and, where transformers' own GGUF loader reads the
family right (checked on mistral), transformers' on the same file. (It drops rope_freqs, so on a Llama 3.1 file
it runs unscaled RoPE, and it misreads a qwen3 head_dim that differs from hidden/heads.)"""

from __future__ import annotations

import math
import random
from typing import Callable

import gguf
import numpy as np
import pytest
import torch
from transformers.configuration_utils import PreTrainedConfig

from tests.tiny_models import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.loader.gguf_file import GGUFFile
from tokenmill.loader.gguf_loader import config_from_gguf, tensors_from_gguf
from tokenmill.sampling_params import SamplingParams

A = gguf.MODEL_ARCH
# tokenmill's tiny family -> llama.cpp's architecture (Mistral and Mixtral are written as llama).
ARCHITECTURES = {"llama": A.LLAMA, "mistral": A.LLAMA, "qwen2_yarn": A.QWEN2, "qwen3": A.QWEN3,
                 "phi3_longrope": A.PHI3, "gemma2": A.GEMMA2, "gemma3": A.GEMMA3, "qwen2_moe": A.QWEN2MOE,
                 "qwen3_moe": A.QWEN3MOE, "mixtral": A.LLAMA, "starcoder2": A.STARCODER2, "phi": A.PHI2,
                 "granite": A.GRANITE}
# Tiny configs brought within what llama.cpp can hold: no window for llama and starcoder2, no dense layer
# among Qwen2-MoE's sparse ones, Gemma's query scaled by its head size, Phi-2's heads all with their own k/v,
# and Gemma 3's fixed pattern of five sliding layers (RoPE base 10000) to one global.
OVERRIDES = {
    "mistral": dict(sliding_window=None), "starcoder2": dict(sliding_window=None),
    "qwen2_moe": dict(mlp_only_layers=[]),
    "gemma2": dict(query_pre_attn_scalar=16), "phi": dict(num_key_value_heads=4),
    "gemma3": dict(query_pre_attn_scalar=16, num_hidden_layers=6,
                   layer_types=["sliding_attention"] * 5 + ["full_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0}}),
}
# llama.cpp's llama graph rotates interleaved pairs; convert permutes these rows for it.
PERMUTED = ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")


def _permute_for_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's llama arch rotates interleaved pairs: each head's rows go from halves to pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama3_rope_freqs(config) -> np.ndarray:
    """Llama 3.1's scaling as llama.cpp stores it: the factor dividing each unscaled frequency."""
    params = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * params["rope_theta"] ** (i / head_dim)
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _write_rope_scaling(writer: gguf.GGUFWriter, config) -> None:
    """As the convert script does: Llama 3.1's as rope_freqs, longrope's as factor tensors, yarn's and
    linear's as metadata (Gemma 3's, its global layers')."""
    params = config.rope_parameters
    params = params.get("full_attention", params)
    rope_type = params.get("rope_type")
    if rope_type == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_freqs(config))
    elif rope_type == "longrope":
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        for tensor, factors in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, params["long_factor"]),
                                (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, params["short_factor"])):
            writer.add_tensor(gguf.TENSOR_NAMES[tensor] + ".weight", np.array(factors, dtype=np.float32))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(params["factor"])
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
    elif rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(params["factor"])


def _write_family_metadata(writer: gguf.GGUFWriter, config, arch) -> None:
    """What each family's convert class adds to the common metadata."""
    if arch in (A.GEMMA2, A.GEMMA3):
        writer.add_sliding_window(config.sliding_window)
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, name, None):
                getattr(writer, f"add_{name}")(getattr(config, name))
    if arch in (A.QWEN2MOE, A.QWEN3MOE) or (arch == A.LLAMA and hasattr(config, "num_local_experts")):
        writer.add_expert_count(getattr(config, "num_experts", None) or config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if arch in (A.QWEN2MOE, A.QWEN3MOE):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch == A.QWEN2MOE:
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if arch == A.PHI2:
        head_dim = config.hidden_size // config.num_attention_heads
        writer.add_rope_dimension_count(int(config.rope_parameters["partial_rotary_factor"] * head_dim))
    if arch == A.GRANITE:
        writer.add_attention_scale(config.attention_multiplier)
        writer.add_embedding_scale(config.embedding_multiplier)
        writer.add_residual_scale(config.residual_multiplier)
        writer.add_logit_scale(config.logits_scaling)


def _converted_tensors(tiny, arch, fuse_gate_up_exps: bool = False):
    """The reference's tensors as convert_hf_to_gguf.py changes them: q/k permuted for llama.cpp's llama
    graph, Gemma's norms stored as 1 + weight, experts stacked per projection, a tied head left out."""
    config = tiny.config
    for name, tensor in tiny.reference.state_dict().items():
        array = tensor.numpy()
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if arch in (A.LLAMA, A.GRANITE) and name.endswith(PERMUTED):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            array = _permute_for_llama_cpp(array, heads)
        if arch in (A.GEMMA2, A.GEMMA3) and name.endswith("norm.weight"):
            array = array + 1
        if name.endswith("experts.gate_up_proj") and fuse_gate_up_exps:  # convert's option: one tensor as well
            yield name.replace("gate_up_proj", "gate_up_proj.weight"), array
        elif name.endswith("experts.gate_up_proj"):  # transformers 5 stacks gate and up in one tensor
            gate, up = np.split(array, 2, axis=1)
            yield name.replace("gate_up_proj", "gate_proj.weight"), gate
            yield name.replace("gate_up_proj", "up_proj.weight"), up
        elif name.endswith("experts.down_proj"):
            yield name + ".weight", array
        else:
            yield name, array


def write_gguf(tiny, family: str, path, q8_0: tuple[str, ...] = (), fuse_gate_up_exps: bool = False,
               blocks: Callable[[str, np.ndarray], tuple[np.ndarray, str] | None] | None = None) -> None:
    """`tiny` as llama.cpp's convert writes `family`; GGUF tensors whose names end with one of `q8_0`
    quantized to Q8_0, those `blocks(gguf name, array)` answers stored as its (blocks, ggml type), the rest
    float32; experts' gate and up in one tensor with `fuse_gate_up_exps`."""
    config, arch = tiny.config, ARCHITECTURES[family]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(f"tiny {family}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    # Phi-2's convert writes 4 * hidden whatever the MLP's size.
    writer.add_feed_forward_length(4 * config.hidden_size if arch == A.PHI2 else config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if arch in (A.STARCODER2, A.PHI2):
        writer.add_layer_norm_eps(getattr(config, "norm_epsilon", None) or config.layer_norm_eps)
    else:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    params = config.rope_parameters
    if arch != A.PHI2:
        writer.add_rope_freq_base(params.get("full_attention", params)["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"w{i}" for i in range(VOCAB)])
    writer.add_token_types([gguf.TokenType.NORMAL] * VOCAB)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    _write_rope_scaling(writer, config)
    _write_family_metadata(writer, config, arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, array in _converted_tensors(tiny, arch, fuse_gate_up_exps):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if name.endswith("experts.gate_up_proj.weight"):  # gguf-py maps it for no architecture yet
            gguf_name = f"blk.{name.split('.')[2]}.ffn_gate_up_exps.weight"
        stored = blocks(gguf_name, array) if blocks else None
        if stored is not None:
            writer.add_tensor(gguf_name, stored[0], raw_dtype=gguf.GGMLQuantizationType[stored[1]])
        elif gguf_name.endswith(q8_0):
            array = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, array, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Config fields a GGUF does not carry (or carries otherwise: Llama 3.1's RoPE as rope_freqs, Mistral as llama).
NOT_IN_GGUF = {"dtype", "initializer_range", "pad_token_id", "transformers_version", "rope_freq_factors"}
WRITTEN_OTHERWISE = {"llama": {"rope_parameters"},
                     "mistral": {"architectures", "model_type", "attention_bias", "mlp_bias", "pretraining_tp"}}


def _same(a, b) -> bool:
    """Equal, floats up to the float32 GGUF metadata holds them in."""
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _config_differences(reference, loaded, family: str) -> dict:
    ignored = NOT_IN_GGUF | WRITTEN_OTHERWISE.get(family, set())
    ref, got = reference.to_dict(), loaded.to_dict()
    keys = (ref.keys() | got.keys()) - ignored
    return {k: (ref.get(k), got.get(k)) for k in keys if not _same(ref.get(k), got.get(k))}


# A config class's own attributes, not fields: a restored config has the base class's (models never read them).
CLASS_ATTRIBUTES = {"base_model_tp_plan", "base_model_pp_plan", "base_model_ep_plan", "attribute_map", "default_theta",
                    "ignore_keys_at_rope_validation", "per_layer_config", "use_cache", "transformers_version"}


def _attribute_differences(built, restored) -> dict:
    """Each public attribute (properties included) on which the restored config answers otherwise."""
    def public(config):
        values = {}
        for name in set(dir(config)) | set(type(config).attribute_map):  # aliases are not in dir()
            if not name.startswith("_") and name not in CLASS_ATTRIBUTES:
                value = getattr(config, name)
                if not callable(value):
                    values[name] = value
        return values
    a, b = public(built), public(restored)
    return {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if not _same(a.get(k), b.get(k))}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2_yarn", "qwen3", "phi3_longrope", "gemma2", "gemma3",
                                    "qwen2_moe", "qwen3_moe", "mixtral", "starcoder2", "phi", "granite"])
def test_gguf_of_each_family_generates_what_transformers_does(family: str, tmp_path) -> None:
    # Large weights, so that RoPE (and its scaling: Llama 3.1's from rope_freqs, yarn, longrope) moves tokens.
    tiny = build_tiny(family, initializer_range=0.2, **OVERRIDES.get(family, {}))
    path = tmp_path / f"tiny-{family}.gguf"
    write_gguf(tiny, family, path)
    rng = random.Random(5)
    # Past longrope's and yarn's original 32 positions: in the prompt, and while generating.
    prompts = [[rng.randrange(4, VOCAB) for _ in range(n)] for n in (25, 70)]
    # A first start with a cache dir builds the family's config class; a second restores it from the cache
    # as transformers' base config (`tokenmill.loader.gguf_config_cache`): both must run the model alike.
    for start in ("first", "cached"):
        engine = Engine(EngineConfig(model_id=str(path), backend="cpu", dtype="float32", kv_cache_bytes=8 << 20,
                                     progress=False, cache_dir=tmp_path / "cache"))
        assert (type(engine.checkpoint.config) is PreTrainedConfig) == (start == "cached")
        assert type(engine.model).__name__ == tiny.config.architectures[0].replace("MistralFor", "LlamaFor")
        if start == "first":
            # Fields that move no greedy token of a tiny model (Gemma's query scale, a layer type) still count.
            assert _config_differences(tiny.config, engine.checkpoint.config, family) == {}
            built = engine.checkpoint.config
        else:  # the base class's `to_dict` names its own model type: the restored one is compared field by field
            assert _attribute_differences(built, engine.checkpoint.config) == {}
        outputs = engine.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
        for prompt, output in zip(prompts, outputs):
            assert [t.id for o in output for t in o.new_tokens] == tiny.greedy(prompt, 12)
    if family == "mistral":
        from transformers import AutoModelForCausalLM

        tiny.reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
        assert [t.id for o in outputs[1] for t in o.new_tokens] == tiny.greedy(prompts[1], 12)


def test_quantized_stacked_experts_are_dequantized_and_kept_from_the_block_path(tmp_path) -> None:
    """ggml blocks are for linear layers: quantized expert stacks (3-D) come back as float experts only."""
    tiny = build_tiny("mixtral")
    path = tmp_path / "tiny-mixtral-q8_0.gguf"
    write_gguf(tiny, "mixtral", path, q8_0=("_exps.weight", "attn_v.weight"))
    file = GGUFFile(path)
    tensors, ggml_weights = tensors_from_gguf(file, config_from_gguf(file), torch.float32)
    assert set(ggml_weights) == {f"model.layers.{layer}.self_attn.v_proj.weight" for layer in range(2)}
    reference = tiny.reference.state_dict()
    size = tiny.config.intermediate_size
    for layer in range(2):
        gate_up = reference[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = reference[f"model.layers.{layer}.mlp.experts.down_proj"]
        for expert in range(tiny.config.num_local_experts):
            prefix = f"model.layers.{layer}.mlp.experts.{expert}"
            for name, want in (("gate_proj", gate_up[expert, :size]), ("up_proj", gate_up[expert, size:]),
                               ("down_proj", down[expert])):
                # Q8_0 keeps each value to within half a step of its 32-value block's max / 127.
                torch.testing.assert_close(tensors[f"{prefix}.{name}.weight"], want, rtol=0,
                                           atol=want.abs().max().item() / 200)
    engine = Engine(EngineConfig(model_id=str(path), backend="cpu", dtype="float32", kv_cache_bytes=8 << 20,
                                 progress=False))
    output = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert len([t for o in output for t in o.new_tokens]) == 4


def test_fused_gate_up_experts_generate_what_transformers_does(tmp_path) -> None:
    """convert_hf_to_gguf.py --fuse-gate-up-exps writes each layer's expert gate and up as one tensor."""
    tiny = build_tiny("qwen3_moe", initializer_range=0.2)
    path = tmp_path / "tiny-qwen3-moe-fused.gguf"
    write_gguf(tiny, "qwen3_moe", path, fuse_gate_up_exps=True)
    assert "blk.0.ffn_gate_up_exps.weight" in GGUFFile(path).tensors
    engine = Engine(EngineConfig(model_id=str(path), backend="cpu", dtype="float32", kv_cache_bytes=8 << 20,
                                 progress=False))
    prompt = [random.Random(7).randrange(4, VOCAB) for _ in range(20)]
    output = engine.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert [t.id for o in output for t in o.new_tokens] == tiny.greedy(prompt, 12)
