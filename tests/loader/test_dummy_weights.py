"""`--load-format dummy`: random weights of a real shape, built on the device, no weight file read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from tests.tiny_models import tiny_tokenizer
from tokenmill.conformance.tiny import COMMON as COMMON_CONFIG
from tokenmill.engine import Engine, EngineConfig
from tokenmill.loader import BUILTIN_SHAPES, ModelNotFoundError, build_dummy_model, load_checkpoint, load_tokenizer
from tokenmill.models import get_model_class
from tokenmill.sampling_params import SamplingParams

LLAMA_3_8B_PARAMETERS = 8_030_261_248  # Meta's model card: 8.03B
LLAMA_3_2_1B_PARAMETERS = 1_235_814_400  # Meta's model card: 1.23B (the head tied to the embeddings)


@pytest.fixture()
def config_folder(tmp_path: Path) -> Path:
    """A folder holding only a config.json: the shape of a model whose weights nobody has here."""
    config = transformers.LlamaConfig(**COMMON_CONFIG)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    return tmp_path


def _engine(model_id: str, seed: int = 0) -> Engine:
    return Engine(EngineConfig(model_id=model_id, load_format="dummy", backend="cpu", dtype="float32",
                               kv_cache_bytes=4 << 20, progress=False, seed=seed))


def test_dummy_model_generates_on_the_cpu_backend(config_folder: Path) -> None:
    engine = _engine(str(config_folder))
    assert engine.checkpoint.format == "dummy"
    outputs = engine.generate([[5, 6, 7, 8], [9, 10]], SamplingParams(max_new_tokens=6, ignore_eos=True))
    for outs in outputs:
        tokens = [t.id for o in outs for t in o.new_tokens]
        assert len(tokens) == 6 and all(0 <= t < COMMON_CONFIG["vocab_size"] for t in tokens)
        assert outs[-1].finished and outs[-1].generated_text  # the id tokenizer decodes every sampled id
    # The same seed gives the same weights, hence the same greedy tokens; another seed, other weights.
    again = _engine(str(config_folder)).generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert [t.id for o in again[0] for t in o.new_tokens] == [t.id for o in outputs[0] for t in o.new_tokens]
    other = _engine(str(config_folder), seed=1)
    assert not torch.equal(other.model.embed_tokens.weight, engine.model.embed_tokens.weight)


def test_dummy_weights_are_scaled_to_keep_activations_finite(config_folder: Path) -> None:
    model = _engine(str(config_folder)).model
    weight = model.layers[0].mlp.down_proj.weight
    assert 0.015 < weight.float().std().item() < 0.025 and abs(weight.float().mean().item()) < 0.005
    assert torch.equal(model.layers[0].input_layernorm.weight, torch.ones_like(model.layers[0].input_layernorm.weight))
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_a_folder_with_tokenizer_files_keeps_its_tokenizer(config_folder: Path) -> None:
    tiny_tokenizer().save_pretrained(config_folder)
    checkpoint = load_checkpoint(str(config_folder), "float32", load_format="dummy")
    assert checkpoint.tensors == {}
    assert checkpoint.tokenizer.convert_tokens_to_ids(["w5", "w6"]) == [5, 6]


def test_builtin_shape_has_llama_3_8b_config_and_a_matching_id_tokenizer() -> None:
    checkpoint = load_checkpoint("llama-3-8b", torch.bfloat16, load_format="dummy")
    config = checkpoint.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size, config.rms_norm_eps, config.max_position_embeddings) == (
        4096, 32, 32, 8, 14336, 128256, 1e-5, 8192)
    assert config.rope_parameters["rope_theta"] == 500000.0
    tokenizer = load_tokenizer("llama-3-8b", load_format="dummy")  # what the router loads
    assert len(tokenizer) == config.vocab_size
    assert tokenizer("t17 t128255").input_ids == [17, 128255]
    assert tokenizer.decode([17, 128255]) == "t17 t128255"
    assert checkpoint.eos_token_ids == (128001,) and tokenizer.eos_token_id == 128001


def test_llama_3_8b_builds_on_meta_with_its_parameter_count() -> None:
    config = load_checkpoint("llama-3-8b", torch.bfloat16, load_format="dummy").config
    model = build_dummy_model(get_model_class(config), config, lambda spec: None, torch.bfloat16,
                              torch.device("meta"))
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == LLAMA_3_8B_PARAMETERS
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in params)  # nothing allocated, even transiently
    assert all(b.is_meta for b in model.buffers())


def test_llama_3_2_1b_builds_on_meta_with_its_shape_and_a_tied_head() -> None:
    config = load_checkpoint("llama-3.2-1b", torch.bfloat16, load_format="dummy").config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (2048, 16, 32, 8, 8192, 128256)
    assert config.rope_parameters["rope_type"] == "llama3"
    model = build_dummy_model(get_model_class(config), config, lambda spec: None, torch.bfloat16,
                              torch.device("meta"))
    assert sum(p.numel() for p in model.parameters()) == LLAMA_3_2_1B_PARAMETERS  # a tied head counted once


def test_dummy_errors_say_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="llama-3-8b"):
        load_checkpoint("no-such-shape", "float32", load_format="dummy")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_checkpoint(None, "float32", load_format="dummy")
    with pytest.raises(Exception, match="has no config.json"):
        load_checkpoint(str(tmp_path), "float32", load_format="dummy")
    with pytest.raises(ValueError, match="auto, dummy"):
        load_checkpoint("llama-3-8b", "float32", load_format="npcache")
    assert set(BUILTIN_SHAPES) >= {"llama-3-8b", "llama-3.2-1b"}
