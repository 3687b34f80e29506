"""Weight-only quantized linear methods on Triton, for every plugin whose device runs Triton.

- `Int8WeightOnly` (`--quantize int8`): symmetric per-output-channel int8.
- `Int4WeightOnly` (`--quantize int4`): asymmetric group-wise 4-bit with integer zero points (the
  GPTQ/AWQ grid), two inputs per byte; a quarter of bf16's bytes plus one scale and zero per group.
- `FP8Weight` (`--quantize fp8`): float8_e4m3fn weights with per-output-channel scales. Where the
  plugin says the device multiplies fp8 (`native_fp8`), bf16 activations are quantized per token to
  fp8 and `torch._scaled_mm` runs the product; elsewhere (and for other dtypes or ragged shapes) a
  Triton kernel dequantizes the weight and keeps the activations as they are.

Each Triton matmul runs through a `torch.library.custom_op` (namespace `tokenmill_triton`) with a
fake implementation, so it traces under torch.compile, stays opaque to CUDA-graph capture, and
answers on the `meta` device. `prepare` quantizes on the weight's own device with torch ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.interfaces import QuantMethod
from tokenmill.plugins.triton import quant_kernels

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT4_GROUP_SIZES = (32, 64, 128, 256)  # powers of two >= the smallest tl.dot K tile worth having
SCALED_MM_ALIGNMENT = 16  # torch._scaled_mm wants K and N multiples of 16


@torch.library.custom_op("tokenmill_triton::int8_matmul", mutates_args=())
def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return quant_kernels.int8_matmul(x, weight, scales)


@torch.library.custom_op("tokenmill_triton::int4_matmul", mutates_args=())
def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    return quant_kernels.int4_matmul(x, packed, scales, zeros, group_size)


@torch.library.custom_op("tokenmill_triton::fp8_matmul", mutates_args=())
def fp8_matmul(x: torch.Tensor, weight_bits: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return quant_kernels.fp8_matmul(x, weight_bits, scales)


@int8_matmul.register_fake
def _(x, weight, scales):
    return x.new_empty(x.shape[0], weight.shape[0])


@int4_matmul.register_fake
def _(x, packed, scales, zeros, group_size):
    return x.new_empty(x.shape[0], packed.shape[0])


@fp8_matmul.register_fake
def _(x, weight_bits, scales):
    return x.new_empty(x.shape[0], weight_bits.shape[0])


@dataclass(frozen=True)
class Int8Weights:
    """What `Int8WeightOnly.prepare` makes of a weight."""

    weight: torch.Tensor  # (out_features, in_features) int8
    scales: torch.Tensor  # (out_features,) float32


@dataclass(frozen=True)
class Int4Weights:
    """What `Int4WeightOnly.prepare` makes of a weight."""

    packed: torch.Tensor  # (out_features, in_features / 2) uint8: input 2i low nibble, 2i + 1 high
    scales: torch.Tensor  # (in_features / group_size, out_features) float32
    zeros: torch.Tensor  # (in_features / group_size, out_features) uint8 in [0, 15]
    group_size: int


@dataclass(frozen=True)
class FP8Weights:
    """What `FP8Weight.prepare` makes of a weight (the same form for both paths)."""

    weight: torch.Tensor  # (out_features, in_features) float8_e4m3fn
    scales: torch.Tensor  # (out_features,) float32


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _restore(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Int8WeightOnly(QuantMethod):
    """Symmetric per-output-channel int8 weights; activations stay in their float dtype."""

    name = "int8"

    def prepare(self, weight: torch.Tensor) -> Int8Weights:
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return Int8Weights(q.contiguous(), scales.contiguous())

    def matmul(self, x: torch.Tensor, prepared: Int8Weights) -> torch.Tensor:
        return _restore(int8_matmul(_flatten(x), prepared.weight, prepared.scales), x)

    def dequantize(self, prepared: Int8Weights) -> torch.Tensor:
        """The float32 weight the kernel multiplies by, exactly."""
        return prepared.weight.float() * prepared.scales[:, None]


class Int4WeightOnly(QuantMethod):
    """Group-wise asymmetric 4-bit weights: per group of `group_size` inputs of one output, a float32
    scale and an integer zero point, w = (q - z) * s with q in [0, 15]."""

    name = "int4"

    def __init__(self, group_size: int | None = None):
        """`group_size` None: per layer, the largest allowed size (128 at most) dividing its inputs, so
        models whose widths are not multiples of 128 (SmolLM2-135M's 576) quantize too."""
        if group_size is not None and group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size {group_size} is not supported; allowed: {INT4_GROUP_SIZES}")
        self.group_size = group_size

    def _group_size_for(self, out_features: int, in_features: int) -> int:
        fitting = [size for size in INT4_GROUP_SIZES if in_features % size == 0]
        if self.group_size is None and fitting:
            return max(size for size in fitting if size <= 128) if min(fitting) <= 128 else min(fitting)
        if self.group_size is not None and self.group_size in fitting:
            return self.group_size
        raise ValueError(
            f"int4 with group size {self.group_size or 'auto'} cannot take a ({out_features}, {in_features}) "
            f"linear weight: in_features must be a multiple of the group size; group sizes that "
            f"divide {in_features}: {fitting or 'none'} (allowed: {INT4_GROUP_SIZES})")

    def prepare(self, weight: torch.Tensor) -> Int4Weights:
        out_features, in_features = weight.shape
        group_size = self._group_size_for(out_features, in_features)
        groups = weight.detach().float().reshape(out_features, -1, group_size)
        # The grid spans [min, max] widened to hold 0, so a zero weight stays exactly zero.
        low = groups.amin(dim=-1).clamp(max=0.0)
        high = groups.amax(dim=-1).clamp(min=0.0)
        scales = ((high - low) / 15.0).clamp(min=1e-8)
        zeros = torch.round(-low / scales).clamp(0, 15)
        q = (torch.round(groups / scales[..., None]) + zeros[..., None]).clamp(0, 15).to(torch.uint8)
        q = q.reshape(out_features, in_features)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
        return Int4Weights(packed.contiguous(), scales.t().contiguous(), zeros.t().to(torch.uint8).contiguous(),
                           group_size)

    def matmul(self, x: torch.Tensor, prepared: Int4Weights) -> torch.Tensor:
        y = int4_matmul(_flatten(x), prepared.packed, prepared.scales, prepared.zeros, prepared.group_size)
        return _restore(y, x)

    def dequantize(self, prepared: Int4Weights) -> torch.Tensor:
        q = torch.stack([prepared.packed & 0xF, prepared.packed >> 4], dim=-1).flatten(1).float()
        scales = prepared.scales.t().repeat_interleave(prepared.group_size, dim=1)
        zeros = prepared.zeros.t().float().repeat_interleave(prepared.group_size, dim=1)
        return (q - zeros) * scales


class FP8Weight(QuantMethod):
    """float8_e4m3fn weights, per-output-channel scale.

    `native_fp8`: the plugin's word that `torch._scaled_mm` multiplies float8_e4m3fn on its device
    (NVIDIA sm_89+; AMD only from the OCP-fp8 GPUs on, MI300 uses the fnuz variant). Then bf16
    activations are quantized per token to fp8 (W8A8, as vLLM does), trading their precision for the
    fp8 tensor cores; otherwise the Triton kernel dequantizes the weight and keeps x as it is.
    """

    name = "fp8"

    def __init__(self, native_fp8: bool):
        self.native_fp8 = native_fp8

    def prepare(self, weight: torch.Tensor) -> FP8Weights:
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
        q = (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return FP8Weights(q.contiguous(), scales.contiguous())

    def uses_scaled_mm(self, x: torch.Tensor, prepared: FP8Weights) -> bool:
        """Whether `matmul` takes `torch._scaled_mm` for this input: its row-wise scaled kernels write
        bf16 only, and want both matrix dims multiples of 16."""
        out_features, in_features = prepared.weight.shape
        return (self.native_fp8 and x.dtype == torch.bfloat16 and in_features % SCALED_MM_ALIGNMENT == 0
                and out_features % SCALED_MM_ALIGNMENT == 0)

    def matmul(self, x: torch.Tensor, prepared: FP8Weights) -> torch.Tensor:
        flat = _flatten(x)
        if self.uses_scaled_mm(x, prepared):
            x_fp8, x_scales = quantize_activations_fp8(flat)
            y = torch._scaled_mm(x_fp8, prepared.weight.t(), scale_a=x_scales, scale_b=prepared.scales[None, :],
                                 out_dtype=x.dtype)
        else:
            y = fp8_matmul(flat, prepared.weight.view(torch.uint8), prepared.scales)
        return _restore(y, x)

    def dequantize(self, prepared: FP8Weights) -> torch.Tensor | None:
        """The weight, where the product is with it alone. With `native_fp8` the activations are
        quantized too, so no dense weight stands for `matmul`: None."""
        return None if self.native_fp8 else fp8_weight(prepared)


def fp8_weight(prepared: FP8Weights) -> torch.Tensor:
    """The float32 weight an `FP8Weights` holds, exactly."""
    return prepared.weight.float() * prepared.scales[:, None]


def quantize_activations_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row) dynamic fp8: ((M, K) float8_e4m3fn, (M, 1) float32 scales), x ~ fp8 * scale."""
    x = x.contiguous()  # _scaled_mm wants the activations row-major
    scales = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def quantization_methods(native_fp8: bool) -> list[QuantMethod]:
    """What a Triton-capable plugin returns from `tokenmill_quantization_methods`."""
    return [Int8WeightOnly(), Int4WeightOnly(), FP8Weight(native_fp8)]
