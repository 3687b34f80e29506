"""A Llama-family GGUF with random bf16 weights, for llama-server where the other servers run `--load-format dummy`.

Written with the `gguf` package as llama.cpp's convert script lays a Llama model out: llama.cpp's tensor
names (from gguf's own name map over the transformers model's parameter names, built on the meta device),
2-D weights in bf16, norms in float32 (ones), Llama 3.1-style RoPE scaling as a `rope_freqs` tensor, no
`output.weight` when the embeddings are tied. The weights are N(0, 0.02) from a seeded generator, like
tokenmill's dummy weights (not the same draws: a fixed-length ignore_eos run's timing does not depend on
them). Q and K are not permuted the way convert permutes real weights: random weights stay random.

The tokenizer goes in from a transformers tokenizer folder (a byte-level BPE `tokenizer.json`) through
gguf's `BpeVocab` and `SpecialVocab`: tokens, types, merges, special ids and the chat template. Tensors
are written one at a time, so a 2.5 GB model never sits whole in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

INIT_STD = 0.02


def _parameter_shapes(config: Any) -> Iterator[tuple[str, tuple[int, ...]]]:
    """transformers' parameter names and shapes for `config`, built on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        yield name, tuple(tensor.shape)


def _llama3_rope_factors(config: Any) -> np.ndarray | None:
    """llama.cpp's `rope_freqs`: each rotary frequency's divisor under Llama 3.1's scaling (None without it)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type") != "llama3":
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plain = 1.0 / params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (plain / scaled.double()).float().numpy()


def _write_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer_folder: Path, pre: str, vocab_size: int) -> None:
    vocab = gguf.BpeVocab(tokenizer_folder)
    tokens, scores, types = zip(*vocab.all_tokens())
    if len(tokens) != vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_folder} has {len(tokens)} tokens; the config says {vocab_size}")
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    gguf.SpecialVocab(tokenizer_folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def write_random_gguf(config: Any, tokenizer_folder: Path, path: Path, pre: str, seed: int = 0) -> Path:
    """`config`'s model as a bf16 GGUF with random weights and `tokenizer_folder`'s tokenizer at `path`.

    `pre` is llama.cpp's name for the tokenizer's pre-tokenizer (`llama-bpe` for Llama 3's). The file
    appears under its name only once complete."""
    arch = gguf.MODEL_ARCH.LLAMA
    if config.model_type != "llama":
        raise ValueError(f"write_random_gguf writes Llama-family GGUFs; got model_type {config.model_type!r}")
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    layout = [(names.get_name(name, try_suffixes=(".weight", ".bias")), shape) for name, shape in _parameter_shapes(config)]
    rope_factors = _llama3_rope_factors(config)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(f"random {config.num_hidden_layers}-layer llama, hidden {config.hidden_size}")
    _write_hparams(writer, config)
    _write_tokenizer(writer, tokenizer_folder, pre, config.vocab_size)
    for name, shape in layout:
        if len(shape) == 1:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.uint16), 2 * int(np.prod(shape)),
                                   raw_dtype=gguf.GGMLQuantizationType.BF16)
    if rope_factors is not None:
        writer.add_tensor_info(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_factors.shape,
                               rope_factors.dtype, rope_factors.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    generator = torch.Generator().manual_seed(seed)
    for _, shape in layout:
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            weight = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, INIT_STD, generator=generator)
            writer.write_tensor_data(weight.view(torch.int16).numpy().view(np.uint16))
    if rope_factors is not None:
        writer.write_tensor_data(rope_factors)
    writer.close()
    partial.rename(path)
    return path
