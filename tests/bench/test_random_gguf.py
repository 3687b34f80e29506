"""The 1B section's GGUF writer, on a tiny Llama shape read back by tokenmill's own GGUF loader."""

import numpy as np
import pytest
import torch
import transformers

from benchmarks.random_gguf import INIT_STD, write_random_gguf
from tests.loader.test_gguf_families import _llama3_rope_freqs
from tokenmill.loader import load_checkpoint
from tokenmill.loader.gguf_file import GGUFFile


@pytest.fixture(scope="module")
def written(bpe_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(bpe_tokenizer), max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=bpe_tokenizer.bos_token_id, eos_token_id=bpe_tokenizer.eos_token_id, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))
    config.architectures = ["LlamaForCausalLM"]
    bpe_tokenizer.save_pretrained(folder)
    path = write_random_gguf(config, folder, folder / "model.gguf", pre="gpt-2")
    return config, path


def test_the_gguf_reads_back_as_the_config_with_random_bf16_weights(written) -> None:
    config, path = written
    gguf = GGUFFile(path)
    assert {info.ggml_type.name for name, info in gguf.tensors.items() if name.endswith("attn_q.weight")} == {"BF16"}
    assert "output.weight" not in gguf.tensors  # tied: the head is the embedding
    checkpoint = load_checkpoint(str(path), torch.float32)
    back = checkpoint.config
    assert (back.hidden_size, back.intermediate_size, back.num_hidden_layers, back.num_attention_heads,
            back.num_key_value_heads, back.vocab_size, back.tie_word_embeddings) == (64, 128, 2, 4, 2,
                                                                                      config.vocab_size, True)
    np.testing.assert_allclose(back.rope_freq_factors, _llama3_rope_freqs(config), rtol=1e-6)
    tensors = checkpoint.tensors
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
    assert torch.equal(tensors["model.norm.weight"], torch.ones(64))
    weights = tensors["model.layers.0.mlp.down_proj.weight"]
    assert weights.shape == (64, 128) and abs(weights.std().item() / INIT_STD - 1) < 0.05
    assert not torch.equal(weights, tensors["model.layers.1.mlp.down_proj.weight"])


def test_the_gguf_tokenizes_as_its_source(written, bpe_tokenizer) -> None:
    _, path = written
    tokenizer = load_checkpoint(str(path), torch.float32).tokenizer
    text = "The keeper climbed the tower at dusk, lit the lamp, and wrote 3 lines in the logbook."
    assert tokenizer.encode(text, add_special_tokens=False) == bpe_tokenizer.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        bpe_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
