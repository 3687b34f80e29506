"""KV-cache storage dtypes (`--kv-cache-dtype`, vLLM's flag and values) and their reference rounding.

A quantized cache stores each written row (one token's keys, or values, of one kv head) as `head_dim`
one-byte codes and one scale: the row's largest magnitude over the format's largest value, kept in
bfloat16 (float32's range, so no row under- or overflows it). A row is the unit a step writes, so its
scale is final when written: a scale per block would grow as later tokens fill the block and force
rewriting the rows already there. The attention kernel folds the key scale into each score and the
value scale into each probability, one multiply per row, and the codes alone are converted per element.

`quantize_rows` and `dequantize_rows` are the reference rounding in PyTorch (round to nearest, ties to
even): backends that declare a dtype store what `quantize_rows` stores, within a rounding step, and the
conformance suite checks their attention against attention over `dequantize_rows`' values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenmill.errors import ValidationError

if TYPE_CHECKING:  # torch is imported where a tensor is touched: the CLI parses the flag without it
    import torch

AUTO = "auto"  # the model's dtype
KV_CACHE_DTYPES = (AUTO, "bfloat16", "fp8_e4m3", "fp8_e5m2", "int8")
ALIASES = {"fp8": "fp8_e4m3"}  # vLLM's
SCALE_BYTES = 2  # scales are bfloat16
# How a layout keeps the scales of a quantized cache (`KVCacheLayout.kv_scales`).
SCALES_PER_TOKEN_HEAD = "token_head"


@dataclass(frozen=True)
class QuantizedFormat:
    """A one-byte KV-cache format: the torch dtype its codes read as, and its largest magnitude."""

    name: str
    code_dtype_name: str  # of torch's dtypes
    max_value: float
    mantissa_bits: int  # the relative rounding step is 2 ** -mantissa_bits (int8: 1 / 127 of the row's largest)

    @property
    def code_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.code_dtype_name)


QUANTIZED_FORMATS = {
    "fp8_e4m3": QuantizedFormat("fp8_e4m3", "float8_e4m3fn", 448.0, 3),
    "fp8_e5m2": QuantizedFormat("fp8_e5m2", "float8_e5m2", 57344.0, 2),
    "int8": QuantizedFormat("int8", "int8", 127.0, 0),
}


def parse_kv_cache_dtype(text: str) -> str:
    """The canonical name of a `--kv-cache-dtype` value; ValidationError naming the choices otherwise."""
    name = ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in KV_CACHE_DTYPES:
        raise ValidationError(f"choose one of {', '.join(KV_CACHE_DTYPES)} (fp8 is fp8_e4m3), got {text!r}")
    return name


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> str:
    """`name` with a cache in the model's own dtype spelled AUTO, the one every layout stores."""
    if name == "bfloat16" and str(model_dtype) == "torch.bfloat16":
        return AUTO
    return name


def quantized_row_bytes(head_dim: int) -> int:
    """Bytes of one stored row: its codes, then its scale."""
    return head_dim + SCALE_BYTES


def quantize_rows(x: torch.Tensor, fmt: QuantizedFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (same shape as `x`, `fmt.code_dtype`) and bfloat16 scales (`x.shape[:-1]`) of each last-dim row."""
    import torch

    x = x.float()
    scale = (x.abs().amax(-1) / fmt.max_value).to(torch.bfloat16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row: any scale
    scaled = (x / scale.float().unsqueeze(-1)).clamp(-fmt.max_value, fmt.max_value)
    codes = scaled.round().to(torch.int8) if fmt.code_dtype == torch.int8 else scaled.to(fmt.code_dtype)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.float().unsqueeze(-1)).to(dtype)


def round_trip(x: torch.Tensor, name: str) -> torch.Tensor:
    """What a cache of dtype `name` gives back for `x` (the reference rounding), in x's dtype."""
    if name == AUTO:
        return x
    if name == "bfloat16":
        import torch

        return x.to(torch.bfloat16).to(x.dtype)
    return dequantize_rows(*quantize_rows(x, QUANTIZED_FORMATS[name]), x.dtype)
