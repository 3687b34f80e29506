"""GGUF files of every family llama.cpp writes and tokenmill runs, written here from tiny random models
the way llama.cpp's convert_hf_to_gguf.py writes them (gguf-py's tensor names and metadata, llama-arch
q/k rows permuted, Llama 3.1's scaling as rope_freqs): each loads and its greedy tokens equal
transformers' on the model it was written from, and, where transformers' own GGUF loader reads the
family right (checked on mistral), transformers' on the same file. (It drops rope_freqs, so on a Llama 3.1 file
it runs unscaled RoPE, and it misreads a qwen3 head_dim that differs from hidden/heads.)"""

from __future__ import annotations

import math
import random

import gguf
import numpy as np
import pytest
import torch

from tests.tiny_models import VOCAB, build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.sampling_params import SamplingParams

# tokenmill's tiny family -> llama.cpp's architecture (Mistral is written as llama).
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA,
                 "qwen2_yarn": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
                 "phi3_longrope": gguf.MODEL_ARCH.PHI3}


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
    """As the convert script does: Llama 3.1's as rope_freqs, longrope's as factor tensors, yarn's as metadata."""
    params = config.rope_parameters
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


def write_gguf(tiny, family: str, path) -> None:
    config, arch = tiny.config, ARCHITECTURES[family]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(f"tiny {family}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
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
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, tensor in tiny.reference.state_dict().items():
        array = tensor.numpy()
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            array = _permute_for_llama_cpp(array, heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2_yarn", "qwen3", "phi3_longrope"])
def test_gguf_of_each_family_generates_what_transformers_does(family: str, tmp_path) -> None:
    # Large weights, so that RoPE (and its scaling: Llama 3.1's from rope_freqs, yarn, longrope) moves tokens.
    overrides = {"sliding_window": None} if family == "mistral" else {}  # llama.cpp keeps no window for llama
    tiny = build_tiny(family, initializer_range=0.2, **overrides)
    path = tmp_path / f"tiny-{family}.gguf"
    write_gguf(tiny, family, path)
    engine = Engine(EngineConfig(model_id=str(path), backend="cpu", dtype="float32", kv_cache_bytes=8 << 20,
                                 progress=False))
    assert type(engine.model).__name__ == tiny.config.architectures[0].replace("Mistral", "Llama")
    rng = random.Random(5)
    # Past longrope's and yarn's original 32 positions: in the prompt, and while generating.
    prompts = [[rng.randrange(4, VOCAB) for _ in range(n)] for n in (25, 70)]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        assert [t.id for o in output for t in o.new_tokens] == tiny.greedy(prompt, 12)
    if family == "mistral":
        from transformers import AutoModelForCausalLM

        tiny.reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
        assert [t.id for o in outputs[1] for t in o.new_tokens] == tiny.greedy(prompts[1], 12)
