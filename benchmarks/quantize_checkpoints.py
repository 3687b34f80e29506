"""Pre-quantized safetensors checkpoints (GPTQ, AWQ, fp8, compressed-tensors) written from a dense
transformers model, by round-to-nearest.

The loader's tests (tiny models) and the bench's perplexity rows (the embedded SmolLM2,
`benchmarks.quantized_safetensors`) both need these files, so the writers live here, in the bench's tooling
that the tests already import, and not in `tokenmill` (nothing a server runs writes checkpoints).

compressed-tensors checkpoints are written by the compressed-tensors library itself (its scheme, its
scales, its compressors). GPTQ and AWQ have no tool that installs and runs here (GPTQModel builds from
source, AutoAWQ wants CUDA), and their calibrated algorithms want a GPU and time anyway: their checkpoints
are packed below from the published layouts, from round-to-nearest codes of the dense weights, and each
writer returns the dequantized weights. So are fp8's two layouts (transformers' block-wise "fp8",
FBGEMM's per-channel "fbgemm_fp8"). The point is each format's path through the loader, not the best
codes a calibrated quantizer would find.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output 8c + AWQ_ORDER[i] goes to nibble i of word c
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def linear_weights(model: Any) -> dict[str, torch.Tensor]:
    """The model's decoder linears (the output head stays dense, as quantizers leave it)."""
    return {name: tensor.detach().float() for name, tensor in model.state_dict().items()
            if name.endswith(".weight") and name.split(".")[-2] in LINEARS}


def round_to_nearest(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                     group_of_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes (out, in), scales and integer zeros (out, groups) with `w ~ scale * (code - zero)`;
    inputs grouped by `group_of_input` (act-order), else in runs of `group_size`, the last one shorter where
    the inputs are no multiple of it (576 in groups of 128), as GPTQ and AWQ quantizers leave it."""
    out_features, in_features = weight.shape
    groups = -(-in_features // group_size)
    group_of_input = torch.arange(in_features) // group_size if group_of_input is None else group_of_input
    members = [weight[:, group_of_input == g] for g in range(groups)]
    top = 2 ** bits - 1
    if symmetric:
        scales = torch.stack([m.abs().amax(-1) for m in members], dim=1) / (top / 2)
        zeros = torch.full_like(scales, (top + 1) // 2)
    else:
        low = torch.stack([m.amin(-1) for m in members], dim=1).clamp(max=0)
        high = torch.stack([m.amax(-1) for m in members], dim=1).clamp(min=0)
        scales = (high - low) / top
        zeros = torch.round(-low / scales).clamp(0, top)
    scales = scales.half().float()  # stored as fp16: the reference uses the rounded scales
    codes = torch.round(weight / scales[:, group_of_input] + zeros[:, group_of_input]).clamp(0, top)
    return codes.long(), scales, zeros.long()


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """`bits`-bit values packed low bits first, 32 // bits to an int32 word along `dim`."""
    per_word = 32 // bits
    moved = codes.long().movedim(dim, -1)
    moved = moved.reshape(*moved.shape[:-1], moved.shape[-1] // per_word, per_word)
    words = (moved << (torch.arange(per_word) * bits)).sum(-1)
    return (words - (words >= 2 ** 31).long() * 2 ** 32).to(torch.int32).movedim(-1, dim).contiguous()


def write_gptq(model: Any, tokenizer: Any, folder: Path, bits: int, group_size: int, desc_act: bool,
               symmetric: bool, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """A GPTQ checkpoint (AutoGPTQ / GPTQModel layout); returns the dequantized weights. Act-order draws
    one seeded random input permutation per layer input (q/k/v share theirs, as GPTQ's shared Hessian gives
    them): without calibration there is no Hessian to order by, and any permutation exercises `g_idx`."""
    generator = torch.Generator().manual_seed(7)
    tensors, dequantized, orders = {}, {}, {}
    for name, weight in linear_weights(model).items():
        module = name.removesuffix(".weight")
        in_features = weight.shape[1]
        size = in_features if group_size == -1 else group_size
        group_of_input = None
        if desc_act:
            key = (module.rsplit(".", 1)[0], module.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
                   in_features)
            order = orders.setdefault(key, torch.randperm(in_features, generator=generator))
            group_of_input = torch.empty(in_features, dtype=torch.long)
            group_of_input[order] = torch.arange(in_features) // size
        codes, scales, zeros = round_to_nearest(weight, bits, size, symmetric, group_of_input)
        groups_of = group_of_input if group_of_input is not None else torch.arange(in_features) // size
        dequantized[name] = (codes - zeros[:, groups_of]) * scales[:, groups_of]
        stored_zeros = (zeros - 1) % 2 ** bits if checkpoint_format == "gptq" else zeros  # v1 stores zero - 1
        tensors[f"{module}.qweight"] = pack_int32(codes.T, bits, 0)
        tensors[f"{module}.qzeros"] = pack_int32(stored_zeros.T, bits, 1)
        tensors[f"{module}.scales"] = scales.T.half().contiguous()
        tensors[f"{module}.g_idx"] = groups_of.to(torch.int32)
    _save(model, tokenizer, folder, tensors, {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                              "desc_act": desc_act, "sym": symmetric,
                                              "checkpoint_format": checkpoint_format})
    return dequantized


def write_awq(model: Any, tokenizer: Any, folder: Path, group_size: int) -> dict[str, torch.Tensor]:
    """An AWQ checkpoint in its GEMM packing (4 bits, zero points); returns the dequantized weights."""
    tensors, dequantized = {}, {}
    for name, weight in linear_weights(model).items():
        module = name.removesuffix(".weight")
        codes, scales, zeros = round_to_nearest(weight, 4, group_size, symmetric=False)
        groups_of = torch.arange(weight.shape[1]) // group_size
        dequantized[name] = (codes - zeros[:, groups_of]) * scales[:, groups_of]
        tensors[f"{module}.qweight"] = _awq_pack(codes.T)
        tensors[f"{module}.qzeros"] = _awq_pack(zeros.T)
        tensors[f"{module}.scales"] = scales.T.half().contiguous()
    _save(model, tokenizer, folder, tensors, {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                              "zero_point": True, "version": "gemm"})
    return dequantized


def _awq_pack(columns: torch.Tensor) -> torch.Tensor:
    rows, count = columns.shape
    interleaved = columns.reshape(rows, count // 8, 8)[:, :, list(AWQ_ORDER)].reshape(rows, count)
    return pack_int32(interleaved, 4, 1)


def write_fp8_blocks(model: Any, tokenizer: Any, folder: Path, block: int) -> dict[str, torch.Tensor]:
    """transformers' "fp8" format: e4m3 weights, one float32 `weight_scale_inv` per block x block tile."""
    tensors, dequantized = {}, {}
    for name, weight in linear_weights(model).items():
        module = name.removesuffix(".weight")
        rows, columns = weight.shape[0] // block, weight.shape[1] // block
        scale = weight.reshape(rows, block, columns, block).abs().amax(dim=(1, 3)) / FP8_MAX
        expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
        codes = (weight / expanded).to(torch.float8_e4m3fn)
        dequantized[name] = codes.float() * expanded
        tensors[f"{module}.weight"] = codes
        tensors[f"{module}.weight_scale_inv"] = scale
    _save(model, tokenizer, folder, tensors, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                              "weight_block_size": [block, block]})
    return dequantized


def write_fp8_channels(model: Any, tokenizer: Any, folder: Path) -> dict[str, torch.Tensor]:
    """FBGEMM's "fbgemm_fp8" format (transformers' FbgemmFp8Config): e4m3 weights, one float32
    `weight_scale` (out, 1) per output channel, and the activation scale bound `input_scale_ub`."""
    tensors, dequantized = {}, {}
    for name, weight in linear_weights(model).items():
        module = name.removesuffix(".weight")
        scale = weight.abs().amax(dim=1, keepdim=True) / FP8_MAX
        codes = (weight / scale).to(torch.float8_e4m3fn)
        dequantized[name] = codes.float() * scale
        tensors[f"{module}.weight"] = codes
        tensors[f"{module}.weight_scale"] = scale
        tensors[f"{module}.input_scale_ub"] = torch.tensor([1200.0])
    _save(model, tokenizer, folder, tensors, {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                              "modules_to_not_convert": ["lm_head"]})
    return dequantized


def write_compressed_tensors(model: Any, tokenizer: Any, folder: Path, weights: dict[str, Any],
                             checkpoint_format: str, input_activations: dict[str, Any] | None = None) -> None:
    """A compressed-tensors checkpoint, made by the library: its scheme applied to a copy of the model, its
    scales (min-max of each group or channel), its compressor and its config. `input_activations` adds the
    scheme's activation quantization to the config (W8A8-FP8's dynamic per-token fp8: no stored scales)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    model = copy.deepcopy(model)
    args = QuantizationArgs(**weights)
    activations = None if input_activations is None else QuantizationArgs(**input_activations)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=activations)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            weight = module.weight.detach()
            if args.strategy == "group":
                weight = weight.unflatten(-1, (-1, args.group_size))
            low, high = weight.amin(-1), weight.amax(-1)
            scale, zero_point = calculate_qparams(low, high, args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, checkpoint_format)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(str(folder))
    tokenizer.save_pretrained(folder)


def _save(model: Any, tokenizer: Any, folder: Path, quantized: dict[str, torch.Tensor],
          quantization_config: dict) -> None:
    """The quantized linears' tensors beside the model's other tensors as they are, a config.json naming the
    quantization, and the tokenizer. A tied output head is the embedding: saved once, as transformers does."""
    folder.mkdir(parents=True, exist_ok=True)
    dense = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()
             if name.removesuffix(".weight").split(".")[-1] not in LINEARS or not name.endswith(".weight")}
    if getattr(model.config, "tie_word_embeddings", False):
        dense.pop("lm_head.weight", None)
    save_file({**dense, **quantized}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)
