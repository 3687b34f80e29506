"""Pre-quantized safetensors checkpoints: GPTQ, AWQ, fp8 and compressed-tensors, read into `QuantizedWeight`.

A checkpoint says how it was quantized in config.json's `quantization_config`; `checkpoint_scheme` reads
that into a `QuantScheme`, which knows the tensors one quantized linear stores (GPTQ's `qweight`,
`qzeros`, `scales`, `g_idx`; compressed-tensors' `weight_packed`, `weight_scale`...) and turns them into
the one normal form backends run (`tokenmill.interfaces.QuantizedWeight`), under the name of the
layer's `.weight`, so the models' loaders place it like a dense weight (fused q/k/v, tensor-parallel
cuts). Every format's own arithmetic is kept exactly: codes as stored, scales and zero points in float32.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from tokenmill.interfaces import QuantizedWeight
from tokenmill.loader.errors import UnsupportedCheckpointError

logger = logging.getLogger(__name__)

# AWQ's GEMM packing puts output 8c + AWQ_ORDER[i] in nibble i of word c; its inverse reads them back.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(k) for k in range(8))
# The formats a checkpoint's weights come in (`QuantizedWeight.format`), which TGI's --quantize also names.
CHECKPOINT_FORMATS = ("gptq", "awq", "fp8", "compressed-tensors")
FP8_CODES = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Integers of `bits` bits packed low bits first into int32 words along `dim`, as uint8 codes
    (the packing GPTQ, AWQ and compressed-tensors share; AWQ then permutes within each word)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    words = packed.to(torch.int32).movedim(dim, -1).unsqueeze(-1)
    codes = ((words >> shifts) & ((1 << bits) - 1)).to(torch.uint8)  # the mask drops the sign's extension
    return codes.flatten(-2).movedim(-1, dim)


class QuantScheme:
    """How one checkpoint stores its quantized linears."""

    format: str  # `QuantizedWeight.format`: "gptq", "awq", "fp8" or "compressed-tensors"
    description: str  # for messages: "GPTQ 4-bit, group 128"
    suffixes: tuple[str, ...]  # the tensors of one quantized linear, by the suffix after its module name
    marker: str  # the suffix whose presence makes a module a quantized linear

    def owns(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether a checkpoint tensor is part of a quantized linear (kept as stored, not cast)."""
        return name.rpartition(".")[2] in self.suffixes

    def is_quantized(self, module: str, parts: Mapping[str, torch.Tensor]) -> bool:
        return self.marker in parts

    def read(self, module: str, parts: Mapping[str, torch.Tensor]) -> QuantizedWeight:
        """One linear's tensors (by suffix) as a QuantizedWeight."""
        raise NotImplementedError


def quantized_to(weight: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    """The same weight with its tensors on `device`."""
    moved = {f.name: getattr(weight, f.name).to(device) for f in dataclasses.fields(weight)
             if isinstance(getattr(weight, f.name), torch.Tensor)}
    return dataclasses.replace(weight, **moved)


def split_quantized(tensors: dict[str, torch.Tensor], scheme: QuantScheme
                    ) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """The checkpoint's dense tensors, and its quantized linears as QuantizedWeights under `<module>.weight`."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, suffix = name.rpartition(".")
        modules.setdefault(module, {})[suffix] = tensor
    dense, quantized = {}, {}
    for module, parts in modules.items():
        if not scheme.is_quantized(module, parts):
            dense.update({f"{module}.{suffix}": tensor for suffix, tensor in parts.items()})
            continue
        try:
            quantized[f"{module}.weight"] = scheme.read(module, parts)
        except (KeyError, ValueError) as exc:
            raise UnsupportedCheckpointError(f"{module}: cannot read its {scheme.description} weight: {exc}") from exc
        dense.update({f"{module}.{suffix}": tensor for suffix, tensor in parts.items() if suffix not in scheme.suffixes})
    return dense, quantized


def _grouped(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_of_input: torch.Tensor | None,
             fmt: str, bits: int, group_size: int | None = None) -> QuantizedWeight:
    """`w = scale[g] * (code - zero[g])` with inputs in groups (`group_of_input[i]`, contiguous when None):
    codes (out, in), scales and zeros (out, groups), as the normal form (act-order sorted to contiguous groups).
    `group_size`: the checkpoint's (None: the inputs over the groups); the last group may be shorter, as
    quantizers leave 576 inputs in groups of 128."""
    out_features, in_features = codes.shape
    groups = scales.shape[1]
    if group_size is None or group_size <= 0 or groups == 1:
        group_size = -(-in_features // groups)
    natural = torch.arange(in_features) // group_size
    group_of_input = natural if group_of_input is None else group_of_input.long()
    sizes = torch.full((groups,), group_size)
    sizes[-1] = in_features - group_size * (groups - 1)
    if sizes[-1] <= 0 or not torch.equal(torch.bincount(group_of_input, minlength=groups), sizes):
        raise ValueError(f"{in_features} inputs are not {groups} groups of {group_size} (the last one no longer)")
    order = None
    if not torch.equal(group_of_input, natural):
        order = torch.argsort(group_of_input, stable=True)  # act-order: each group's inputs side by side
        codes = codes[:, order]
    offsets = None if zeros is None else -scales * zeros
    # The normal form's groups are equal: with a short last group, each group's scale and offset cover
    # sub-groups of gcd(group_size, in_features) inputs, the same weights exactly.
    fine = math.gcd(group_size, in_features)
    if fine != group_size:
        group_of_fine = torch.arange(in_features // fine) * fine // group_size
        scales = scales[:, group_of_fine]
        offsets = None if offsets is None else offsets[:, group_of_fine]
    return QuantizedWeight(fmt, f"uint{bits}", codes.contiguous(), scales.contiguous(),
                           None if offsets is None else offsets.contiguous(), fine, order)


@dataclass(frozen=True)
class GPTQScheme(QuantScheme):
    """GPTQ (AutoGPTQ / GPTQModel): `qweight` (in / 32 * bits, out) int32 packed along the inputs, `qzeros`
    (groups, out / 32 * bits) packed along the outputs, `scales` (groups, out) fp16, `g_idx` (in,) each
    input's group (act-order). The original ("gptq", v1) format stores each zero point minus one, which
    transformers and GPTQModel add back on load; "gptq_v2" stores it as it is. Added back per code, modulo
    2 ** bits, every zero point comes back (GPTQModel adds to the packed words, where a zero point of 0,
    stored as all ones, carries into its neighbour; symmetric checkpoints, zero 2 ** (bits - 1), never do).
    """

    bits: int
    group_size: int
    act_order: bool
    zeros_minus_one: bool
    format = "gptq"
    suffixes = ("qweight", "qzeros", "scales", "g_idx")
    marker = "qweight"

    @property
    def description(self) -> str:
        group = "per-channel" if self.group_size <= 0 else f"group {self.group_size}"
        return f"GPTQ {self.bits}-bit, {group}" + (", act-order" if self.act_order else "")

    def read(self, module: str, parts: Mapping[str, torch.Tensor]) -> QuantizedWeight:
        codes = unpack_int32(parts["qweight"], self.bits, 0).T
        zeros = unpack_int32(parts["qzeros"], self.bits, 1).T.long()
        if self.zeros_minus_one:  # modulo: a zero point of 0 was stored as -1, all ones in `bits` bits
            zeros = (zeros + 1) % (1 << self.bits)
        zeros = zeros.float()
        scales = parts["scales"].float().T
        return _grouped(codes, scales, zeros, parts.get("g_idx"), self.format, self.bits, self.group_size)


@dataclass(frozen=True)
class AWQScheme(QuantScheme):
    """AWQ's GEMM packing: `qweight` (in, out / 8) int32 packed along the outputs in `AWQ_ORDER`, `qzeros`
    (groups, out / 8) likewise, `scales` (groups, out); `w = (q - zero) * scale`."""

    group_size: int
    format = "awq"
    suffixes = ("qweight", "qzeros", "scales")
    marker = "qweight"

    @property
    def description(self) -> str:
        return f"AWQ 4-bit, group {self.group_size}"

    def read(self, module: str, parts: Mapping[str, torch.Tensor]) -> QuantizedWeight:
        codes = _awq_unpack(parts["qweight"]).T
        zeros = _awq_unpack(parts["qzeros"]).T.float()
        return _grouped(codes, parts["scales"].float().T, zeros, None, self.format, 4, self.group_size)


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    codes = unpack_int32(packed, 4, 1)
    rows, columns = codes.shape
    return codes.view(rows, columns // 8, 8)[:, :, list(AWQ_REVERSE_ORDER)].reshape(rows, columns)


@dataclass(frozen=True)
class FP8Scheme(QuantScheme):
    """fp8 weights with float32 scales: transformers' "fp8" (`weight_scale_inv` per `weight_block_size`
    block of outputs x inputs, DeepSeek-V3 style), or per-tensor / per-channel `weight_scale` (FBGEMM,
    vLLM's fp8). Activation scales (`input_scale`) are dropped: the weights are run weight-only."""

    block_size: tuple[int, int] | None
    format = "fp8"
    suffixes = ("weight", "weight_scale", "weight_scale_inv", "input_scale", "input_scale_ub")
    marker = "weight"

    @property
    def description(self) -> str:
        return "fp8" + (f", blocks of {self.block_size[0]}x{self.block_size[1]}" if self.block_size else "")

    def owns(self, name: str, tensor: torch.Tensor) -> bool:
        return tensor.dtype in FP8_CODES or name.rpartition(".")[2] in self.suffixes[1:]

    def is_quantized(self, module: str, parts: Mapping[str, torch.Tensor]) -> bool:
        return "weight" in parts and parts["weight"].dtype in FP8_CODES

    def read(self, module: str, parts: Mapping[str, torch.Tensor]) -> QuantizedWeight:
        return _fp8_weight(parts["weight"], parts.get("weight_scale_inv", parts.get("weight_scale")), self.format,
                           self.block_size)


def _fp8_weight(weight: torch.Tensor, scale: torch.Tensor, fmt: str,
                block_size: tuple[int, int] | None = None) -> QuantizedWeight:
    """fp8 bits with a scale that is one number, one per output, or one per block of outputs x inputs."""
    out_features, in_features = weight.shape
    scale = scale.float().reshape(-1, 1) if scale.dim() < 2 else scale.float()
    if block_size is not None:  # each row gets its block row's scales, one per block of inputs
        if in_features % block_size[1] or scale.shape[1] != in_features // block_size[1]:
            raise ValueError(f"{in_features} inputs are not whole {block_size[1]}-input scale blocks")
        scale = scale.repeat_interleave(block_size[0], dim=0)[:out_features]
    scale = scale.expand(out_features, scale.shape[1])
    return QuantizedWeight(fmt, FP8_CODES[weight.dtype], weight.view(torch.uint8).contiguous(), scale.contiguous(),
                           None, in_features // scale.shape[1])


@dataclass(frozen=True)
class CompressedTensorsScheme(QuantScheme):
    """compressed-tensors (llm-compressor's format): `config_groups` each give a weight scheme and the
    modules it targets (a class name such as "Linear", a module name, or "re:" and a regex).

    Formats read: "pack-quantized" (`weight_packed` int32 along the inputs, codes offset by
    2 ** (bits - 1) from the signed values; `weight_scale`, `weight_shape`, optional `weight_zero_point`),
    "int-quantized" (int8 `weight`), and "float-quantized" (fp8 `weight` and `weight_scale`; W8A8-FP8's
    activation quantization is not done: the weights run weight-only)."""

    checkpoint_format: str
    groups: tuple[tuple[tuple[str, ...], Mapping[str, Any]], ...]  # (targets, weight args)
    format = "compressed-tensors"
    suffixes = ("weight", "weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
                "input_scale", "input_zero_point", "weight_global_scale", "weight_g_idx")
    marker = "weight_scale"

    @property
    def description(self) -> str:
        names = []
        for _, args in self.groups:
            strategy = args.get("strategy", "tensor")
            detail = f"group {args.get('group_size')}" if strategy == "group" else strategy
            names.append(f"{args.get('type', 'int')}{args.get('num_bits')} {detail}")
        return f"compressed-tensors {self.checkpoint_format} ({'; '.join(names)})"

    def owns(self, name: str, tensor: torch.Tensor) -> bool:
        suffix = name.rpartition(".")[2]
        return suffix in self.suffixes[1:] or (suffix == "weight" and not tensor.is_floating_point()) \
            or tensor.dtype in FP8_CODES

    def read(self, module: str, parts: Mapping[str, torch.Tensor]) -> QuantizedWeight:
        args = self._weight_args(module)
        bits, scale = int(args["num_bits"]), parts["weight_scale"]
        if args.get("type", "int") == "float":
            return _fp8_weight(parts["weight"], scale, self.format)
        if args.get("actorder") not in (None, False) and "weight_g_idx" in parts:
            raise ValueError("compressed-tensors act-order (weight_g_idx) is not read")
        if "weight_packed" in parts:
            out_features, in_features = (int(n) for n in parts["weight_shape"].tolist())
            codes = unpack_int32(parts["weight_packed"], bits, 1)[:, :in_features]
        else:  # int-quantized: the signed values as int8
            out_features, in_features = parts["weight"].shape
            codes = (parts["weight"].to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
        scale = scale.float()
        scales = scale.reshape(out_features, -1) if scale.numel() > 1 else scale.reshape(1, 1).expand(out_features, 1)
        zeros = torch.full_like(scales, float(1 << (bits - 1)))  # the signed values' offset in the codes
        if "weight_zero_point" in parts:
            zero_point = parts["weight_zero_point"]
            if zero_point.dtype == torch.int32 and zero_point.shape[0] != out_features:  # packed along the outputs
                zero_point = unpack_int32(zero_point, bits, 0)[:out_features].to(torch.int16) - (1 << (bits - 1))
            zeros = zeros + zero_point.float().reshape(out_features, -1)
        return _grouped(codes, scales, zeros, None, self.format, bits, args.get("group_size"))

    def _weight_args(self, module: str) -> Mapping[str, Any]:
        for targets, args in self.groups:
            if any(_matches(module, target) for target in targets):
                return args
        if len(self.groups) == 1:  # targets name module classes ("Linear"): every quantized linear is one
            return self.groups[0][1]
        raise ValueError(f"no config group of {[t for t, _ in self.groups]} names it")


def _matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return module == target or module.endswith(f".{target}")


def checkpoint_scheme(config: Any) -> QuantScheme | None:
    """The quantization a transformers config's `quantization_config` describes, None for a dense
    checkpoint; a refusal (`UnsupportedCheckpointError`) naming what is not read."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = str(quant.get("quant_method", "")).lower()
    readers: dict[str, Callable[[dict], QuantScheme]] = {
        "gptq": _gptq, "awq": _awq, "fp8": _fp8, "fbgemm_fp8": _fp8, "compressed-tensors": _compressed_tensors}
    if method not in readers:
        raise UnsupportedCheckpointError(f"checkpoints quantized with {method or 'an unnamed method'!r} are not read; "
                                         f"tokenmill reads GPTQ, AWQ, fp8 and compressed-tensors checkpoints")
    return readers[method](quant)


def _gptq(quant: dict) -> GPTQScheme:
    bits = int(quant.get("bits", 4))
    checkpoint_format = quant.get("checkpoint_format", quant.get("format", "gptq"))
    if bits not in (2, 4, 8):
        raise UnsupportedCheckpointError(f"GPTQ {bits}-bit checkpoints are not read (2, 4 and 8 bits are)")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise UnsupportedCheckpointError(f"GPTQ checkpoints in the {checkpoint_format!r} layout are not read "
                                         "(the 'gptq' and 'gptq_v2' layouts are)")
    return GPTQScheme(bits, int(quant.get("group_size", 128)), bool(quant.get("desc_act", False)),
                      checkpoint_format == "gptq")


def _awq(quant: dict) -> AWQScheme:
    version = str(quant.get("version", "gemm")).lower()
    if int(quant.get("bits", quant.get("w_bit", 4))) != 4 or version != "gemm":
        raise UnsupportedCheckpointError(f"AWQ checkpoints are read in the 4-bit GEMM packing, not {version!r} "
                                         f"with {quant.get('bits')} bits")
    if not quant.get("zero_point", True):
        raise UnsupportedCheckpointError("AWQ checkpoints without zero points are not read")
    return AWQScheme(int(quant.get("group_size", quant.get("q_group_size", 128))))


def _fp8(quant: dict) -> FP8Scheme:
    block = quant.get("weight_block_size")
    return FP8Scheme(tuple(block) if block else None)


def _compressed_tensors(quant: dict) -> CompressedTensorsScheme:
    checkpoint_format = quant.get("format", "")
    groups = []
    for name, group in (quant.get("config_groups") or {}).items():
        args = group.get("weights") or {}
        group_format = group.get("format") or checkpoint_format
        kind, strategy = (args.get("type"), args.get("num_bits")), args.get("strategy")
        readable = group_format in ("pack-quantized", "int-quantized", "float-quantized") and (
            (kind in (("int", 4), ("int", 8)) and strategy in ("group", "channel", "tensor"))
            or (kind == ("float", 8) and strategy in ("channel", "tensor")))
        if not readable:
            raise UnsupportedCheckpointError(
                f"compressed-tensors group {name!r} ({group_format}, {args.get('type')}{args.get('num_bits')}, "
                f"{args.get('strategy')}) is not read; read are int4/int8 pack- or int-quantized weights per group, "
                "channel or tensor, and fp8 float-quantized weights per channel or tensor")
        groups.append((tuple(group.get("targets") or ()), args))
    if not groups:
        raise UnsupportedCheckpointError("a compressed-tensors checkpoint without config_groups is not read")
    return CompressedTensorsScheme(checkpoint_format, tuple(groups))
