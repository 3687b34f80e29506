"""Pre-quantized safetensors checkpoints (GPTQ, AWQ, fp8, compressed-tensors) served end to end.

Where transformers runs the format on this CPU (compressed-tensors, which it decompresses; transformers'
fp8, which it dequantizes without a GPU), the engine's greedy tokens in fp32 must be transformers' on the
same checkpoint; GPTQ and AWQ, which transformers runs only through GPTQModel, are compared with the tiny
model carrying the checkpoint's dequantized weights. The weights themselves are checked exactly too.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from tests.cpu_delegate import CPUDelegate
from benchmarks.quantize_checkpoints import (write_awq, write_compressed_tensors, write_fp8_blocks,
                                             write_fp8_channels, write_gptq)
from tests.tiny_models import build_tiny, tiny_tokenizer
from tokenmill import hookimpl
from tokenmill.backend import Backend
from tokenmill.engine import Engine, EngineConfig
from tokenmill.errors import ValidationError
from tokenmill.loader import load_checkpoint
from tokenmill.registry import load_registry
from tokenmill.sampling_params import SamplingParams

PROMPTS = [[5, 17, 33, 90, 4, 200, 7], [9, 9, 120, 3]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama")


@pytest.fixture(scope="module")
def tiny_qwen2():  # q/k/v biases: they stay dense beside the quantized weights
    return build_tiny("qwen2")


def _engine_tokens(folder, dtype: str = "float32", backend: Backend | None = None) -> list[list[int]]:
    engine = Engine(EngineConfig(model_id=str(folder), dtype=dtype, kv_cache_bytes=4 << 20, progress=False,
                                 backend=None if backend is None else backend.name), backend=backend)
    outputs = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)] * len(PROMPTS))
    return [[token.id for output in request for token in output.new_tokens] for request in outputs]


def _greedy(model) -> list[list[int]]:
    # As `TinyModel.greedy`: never stopping at the end-of-sequence token, as the engine runs with ignore_eos.
    return [model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
            for prompt in PROMPTS]


def dense_reference(tiny, dequantized: dict[str, torch.Tensor]):
    """The tiny transformers model with the checkpoint's dequantized weights in place of its own."""
    model = copy.deepcopy(tiny.reference)
    model.load_state_dict(dequantized, strict=False)
    return model.eval()


def _assert_weights(folder, expected: dict[str, torch.Tensor]) -> None:
    quantized = load_checkpoint(str(folder), "float32", progress=False).quantized_weights
    assert sorted(quantized) == sorted(expected)
    for name, weight in expected.items():
        torch.testing.assert_close(quantized[name].dequantize(), weight.float(), rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("weights,checkpoint_format", [
    (dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32), "pack-quantized"),  # W4A16
    (dict(num_bits=8, type="int", symmetric=True, strategy="channel"), "pack-quantized"),  # W8A16
    (dict(num_bits=8, type="float", symmetric=True, strategy="channel"), "float-quantized"),  # FP8 weights
], ids=["w4a16-group32", "w8a16-channel", "fp8-channel"])
def test_compressed_tensors_checkpoints_give_transformers_tokens(tiny, tmp_path, weights, checkpoint_format) -> None:
    pytest.importorskip("compressed_tensors")
    write_compressed_tensors(tiny.reference, tiny_tokenizer(), tmp_path, weights, checkpoint_format)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32,
        quantization_config=transformers.CompressedTensorsConfig(run_compressed=False)).eval()
    decompressed = {name: tensor for name, tensor in reference.state_dict().items()
                    if name.endswith(("proj.weight",))}
    _assert_weights(tmp_path, decompressed)
    expected = _greedy(reference)
    assert _engine_tokens(tmp_path) == expected


def test_asymmetric_compressed_tensors_weights_are_the_librarys_dequantization(tiny, tmp_path) -> None:
    # transformers 5.24 cannot load these (it expects unpacked zero points): the library's own
    # quantize-dequantize of the original weights with the stored scales is the reference.
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from safetensors import safe_open

    args = dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    write_compressed_tensors(tiny.reference, tiny_tokenizer(), tmp_path, args, "pack-quantized")
    expected = {}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        for name, weight in tiny.reference.state_dict().items():
            module = name.removesuffix(".weight")
            if f"{module}.weight_packed" in handle.keys():
                zero_point = _zero_points(tiny.reference.get_submodule(module))
                expected[name] = fake_quantize(weight, handle.get_tensor(f"{module}.weight_scale"), zero_point,
                                               QuantizationArgs(**args))
    _assert_weights(tmp_path, expected)


def _zero_points(module) -> torch.Tensor:
    """The zero points the library computes for a module's weight, as `write_compressed_tensors` does."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    grouped = module.weight.detach().unflatten(-1, (-1, 32))
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    return calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)[1]


def test_fp8_block_checkpoints_give_transformers_tokens(tiny, tmp_path) -> None:
    dequantized = write_fp8_blocks(tiny.reference, tiny_tokenizer(), tmp_path, block=32)
    _assert_weights(tmp_path, dequantized)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    expected = _greedy(reference)
    assert expected == _greedy(dense_reference(tiny, dequantized))  # transformers ran the same weights
    assert _engine_tokens(tmp_path) == expected


def test_fp8_per_channel_checkpoints_give_the_dequantized_models_tokens(tiny, tmp_path) -> None:
    # FBGEMM's layout: transformers runs it only through fbgemm-gpu, so the dequantized model is the reference.
    dequantized = write_fp8_channels(tiny.reference, tiny_tokenizer(), tmp_path)
    _assert_weights(tmp_path, dequantized)
    assert _engine_tokens(tmp_path) == _greedy(dense_reference(tiny, dequantized))


@pytest.mark.parametrize("bits,group_size,desc_act,symmetric,checkpoint_format", [
    (4, 32, True, False, "gptq"),  # act-order, asymmetric, v1's zero - 1 (zero points of 0 included)
    (8, -1, False, True, "gptq_v2"),
    (4, 48, True, True, "gptq"),  # 64 and 128 inputs in groups of 48: a short last group, as 576 in 128s
], ids=["4bit-g32-actorder-asym-v1", "8bit-perchannel-sym-v2", "4bit-g48-short-last-group"])
def test_gptq_checkpoints_give_the_dequantized_models_tokens(tiny_qwen2, tmp_path, bits, group_size, desc_act,
                                                             symmetric, checkpoint_format) -> None:
    dequantized = write_gptq(tiny_qwen2.reference, tiny_tokenizer(), tmp_path, bits, group_size, desc_act, symmetric,
                             checkpoint_format)
    _assert_weights(tmp_path, dequantized)
    assert _engine_tokens(tmp_path) == _greedy(dense_reference(tiny_qwen2, dequantized))


def test_awq_checkpoints_give_the_dequantized_models_tokens(tiny, tmp_path) -> None:
    dequantized = write_awq(tiny.reference, tiny_tokenizer(), tmp_path, group_size=32)
    _assert_weights(tmp_path, dequantized)
    assert _engine_tokens(tmp_path) == _greedy(dense_reference(tiny, dequantized))


def test_a_bf16_model_runs_a_gptq_checkpoint_as_its_dequantized_weights(tiny, tmp_path) -> None:
    # The bf16 model runs the codes through the backend's kernel (the CPU's grouped_kernels.h), at least as exact
    # as the dequantized weight in bf16: on this model (deterministic, no near-tie), the same greedy tokens.
    dequantized = write_gptq(tiny.reference, tiny_tokenizer(), tmp_path / "gptq", 4, 32, False, True)
    reference = dense_reference(tiny, dequantized)
    reference.save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    assert _engine_tokens(tmp_path / "gptq", "bfloat16") == _engine_tokens(tmp_path / "dense", "bfloat16")


class NoCheckpointFormats(CPUDelegate):
    """The CPU without a method for pre-quantized checkpoints, but one that takes AWQ's."""

    def __init__(self, formats: frozenset[str]) -> None:
        self.formats = formats

    @hookimpl
    def tokenmill_quantization_methods(self):
        from tokenmill.plugins.cpu.quant import DequantizedFloatLinear

        method = DequantizedFloatLinear()
        method.checkpoint_formats = self.formats
        return [method]


@pytest.mark.parametrize("formats,runs", [(frozenset(), "none"), (frozenset({"awq"}), "awq")])
def test_a_gptq_checkpoint_on_a_backend_without_a_gptq_method_is_refused_at_start(tiny, tmp_path, formats, runs):
    write_gptq(tiny.reference, tiny_tokenizer(), tmp_path, 4, 128 // 2, False, True)
    backend = Backend(load_registry(extra_plugins=[("noformats", NoCheckpointFormats(formats))]), "noformats")
    with pytest.raises(ValidationError, match=f"GPTQ 4-bit, group 64 checkpoint .*formats it runs: {runs}$"):
        _engine_tokens(tmp_path, backend=backend)


def test_quantize_with_a_pre_quantized_checkpoint_is_refused(tiny, tmp_path) -> None:
    write_awq(tiny.reference, tiny_tokenizer(), tmp_path, group_size=32)
    with pytest.raises(ValidationError, match=r"already quantized \(AWQ 4-bit, group 32\).*without --quantize int8"):
        Engine(EngineConfig(model_id=str(tmp_path), dtype="float32", kv_cache_bytes=4 << 20, progress=False,
                            quantize="int8"))


def test_tgis_quantize_naming_the_checkpoints_own_format_is_accepted(tiny, tmp_path) -> None:
    write_awq(tiny.reference, tiny_tokenizer(), tmp_path / "awq", group_size=32)
    engine = Engine(EngineConfig(model_id=str(tmp_path / "awq"), dtype="float32", kv_cache_bytes=4 << 20,
                                 progress=False, quantize="awq"))
    assert engine.model.layers[0].self_attn.qkv_proj.quant_method.name == "float"
    tiny.reference.save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValidationError, match="--quantize gptq names a pre-quantized checkpoint format, and this "
                                              "checkpoint is not quantized"):
        Engine(EngineConfig(model_id=str(tmp_path / "dense"), dtype="float32", kv_cache_bytes=4 << 20,
                            progress=False, quantize="gptq"))


@pytest.mark.parametrize("quantization_config,message", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "checkpoints quantized with 'bitsandbytes' are not read"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "GPTQ 3-bit checkpoints are not read"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "in the 'marlin' layout are not read"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "4-bit GEMM packing, not 'gemv'"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group"}}}},
     "group 'group_0' \\(nvfp4-pack-quantized, float4, tensor_group\\) is not read"),
])
def test_checkpoints_in_formats_not_read_are_refused_naming_them(quantization_config, message) -> None:
    from types import SimpleNamespace

    from tokenmill.loader.errors import UnsupportedCheckpointError
    from tokenmill.loader.quantized_checkpoints import checkpoint_scheme

    with pytest.raises(UnsupportedCheckpointError, match=message):
        checkpoint_scheme(SimpleNamespace(quantization_config=quantization_config))
