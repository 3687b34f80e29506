"""Reading PEFT adapters without peft: the flags' syntax, scales, and every refusal a user could meet."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.lora_adapters import ATTENTION, MLP, write_adapter
from tests.tiny_models import build_tiny
from tokenmill.engine import Engine, EngineConfig
from tokenmill.errors import ValidationError
from tokenmill.interfaces import LoRABatch, LoRAMethod
from tokenmill.lora import parse_lora_adapters, parse_lora_modules
from tokenmill.lora.batch import group_by_slot
from tokenmill.lora.peft import read_peft_adapter


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama")


def test_tgi_flag_takes_named_and_bare_adapters() -> None:
    assert parse_lora_adapters("sql=/a/sql, chat=/b/chat,org/name") == (
        ("sql", "/a/sql"), ("chat", "/b/chat"), ("org/name", "org/name"))
    with pytest.raises(ValidationError, match="name=path"):
        parse_lora_adapters("=/a/sql")


def test_vllm_flag_takes_pairs_and_json() -> None:
    assert parse_lora_modules(["sql=/a/sql", '{"name": "chat", "path": "/b/chat", "base_model_name": "x"}']) == (
        ("sql", "/a/sql"), ("chat", "/b/chat"))
    with pytest.raises(ValidationError, match="name=path"):
        parse_lora_modules(["/a/sql"])
    with pytest.raises(ValidationError, match='"name" and "path"'):
        parse_lora_modules(['{"name": "chat"}'])


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scale_is_alpha_over_rank_or_its_square_root(tiny, tmp_path, use_rslora) -> None:
    folder = write_adapter(tmp_path, tiny.reference, ("q_proj", "down_proj"), rank=4, alpha=12,
                           use_rslora=use_rslora)
    adapter = read_peft_adapter("a", folder)
    scale = 12 / math.sqrt(4) if use_rslora else 12 / 4
    files = load_file(str(folder / "adapter_model.safetensors"))
    assert sorted(adapter.modules) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj"))
    a, b = adapter.modules["model.layers.1.mlp.down_proj"]
    assert torch.equal(a, files["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"])
    torch.testing.assert_close(b, files["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"] * scale)


@pytest.mark.parametrize("setting, value, named", [
    ("use_dora", True, "DoRA"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("bias", "lora_only", "bias"),
    ("rank_pattern", {"q_proj": 16}, "rank_pattern"),
    ("alpha_pattern", {"q_proj": 4}, "alpha_pattern"),
    ("fan_in_fan_out", True, "fan_in_fan_out"),
    ("peft_type", "PREFIX_TUNING", "PREFIX_TUNING"),
])
def test_what_changes_the_computation_and_is_not_implemented_is_refused(tiny, tmp_path, setting, value,
                                                                         named) -> None:
    folder = write_adapter(tmp_path, tiny.reference, ATTENTION, **{setting: value})
    with pytest.raises(ValidationError, match=named):
        read_peft_adapter("a", folder)


def test_dora_magnitudes_and_embedding_adapters_are_refused_by_their_tensors(tiny, tmp_path) -> None:
    folder = write_adapter(tmp_path, tiny.reference, ATTENTION)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    for extra, named in (("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"),
                         ("base_model.model.model.embed_tokens.lora_embedding_A", "embedding")):
        save_file({**tensors, extra: torch.ones(64)}, str(folder / "adapter_model.safetensors"))
        with pytest.raises(ValidationError, match=named):
            read_peft_adapter("a", folder)


def test_a_pickled_adapter_is_refused_with_how_to_convert_it(tiny, tmp_path) -> None:
    folder = write_adapter(tmp_path, tiny.reference, ATTENTION)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ValidationError, match="safe_serialization=True"):
        read_peft_adapter("a", folder)
    with pytest.raises(ValidationError, match="adapter_config.json"):
        read_peft_adapter("a", tmp_path / "nowhere")


def test_a_rank_the_config_does_not_announce_is_refused(tiny, tmp_path) -> None:
    folder = write_adapter(tmp_path, tiny.reference, ATTENTION, rank=8)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(ValidationError, match="r=4"):
        read_peft_adapter("a", folder)


def _engine(tiny, adapters) -> Engine:
    config = EngineConfig(backend="cpu", dtype="float32", kv_cache_bytes=4 << 20, progress=False,
                          lora_adapters=tuple(adapters))
    return Engine(config, checkpoint=tiny.checkpoint())


def test_adapting_the_head_or_another_model_is_refused_at_load(tiny, tmp_path) -> None:
    head = write_adapter(tmp_path / "head", tiny.reference, ATTENTION)
    tensors = load_file(str(head / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.zeros(256, 8)
    save_file(tensors, str(head / "adapter_model.safetensors"))
    with pytest.raises(ValidationError, match="cannot adapt.*lm_head|lm_head.*cannot adapt"):
        _engine(tiny, [("head", str(head))])
    other = write_adapter(tmp_path / "other", build_tiny("llama", hidden_size=32, num_attention_heads=2,
                                                         num_key_value_heads=1).reference, MLP)
    with pytest.raises(ValidationError, match="was it trained on this model"):
        _engine(tiny, [("other", str(other))])
    with pytest.raises(ValidationError, match="neither a local folder nor a hub id"):
        _engine(tiny, [("missing", str(tmp_path / "missing"))])
    ok = write_adapter(tmp_path / "ok", tiny.reference, MLP)
    with pytest.raises(ValidationError, match="unique.*same"):
        _engine(tiny, [("same", str(ok)), ("same", str(head))])


def test_tokens_are_grouped_by_slot_stably_and_padding_is_base() -> None:
    slots = np.array([2, 0, 1, 2, 2, 0, 1, 3])
    packed, segments = group_by_slot(slots, num_tokens=10)
    assert packed[:10].tolist() == [2, 0, 1, 2, 2, 0, 1, 3, 0, 0]
    rows = packed[10:].tolist()
    assert segments == ((1, 0, 2), (2, 2, 5), (3, 5, 6))
    assert [rows[s:e] for _, s, e in segments] == [[2, 6], [0, 3, 4], [7]]
    packed, segments = group_by_slot(np.zeros(3, dtype=np.int64), num_tokens=3)
    assert segments == () and packed.tolist() == [0, 0, 0]


def test_the_reference_method_adds_each_token_s_own_adapter() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, 10, generator=generator, dtype=torch.float64)
    b = torch.randn(4, 7, 3, generator=generator, dtype=torch.float64)
    a[0], b[0] = 0, 0
    x = torch.randn(9, 10, generator=generator, dtype=torch.float64)
    slots = np.array([3, 0, 1, 1, 3, 0, 2, 1, 0])
    packed, segments = group_by_slot(slots, 9)
    packed = torch.from_numpy(packed)
    batch = LoRABatch(packed[:9], packed[9:], segments)
    y = torch.randn(9, 7, generator=generator, dtype=torch.float64)
    expected = torch.stack([y[i] + b[s] @ (a[s] @ x[i]) for i, s in enumerate(slots.tolist())])
    torch.testing.assert_close(LoRAMethod().apply(y.clone(), x, (a, b), batch), expected)
