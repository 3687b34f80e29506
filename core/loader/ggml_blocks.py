"""GGUF block types in the core's one form for pre-quantized weights, `QuantizedWeight(format="gguf")`.

Every ggml type here is, per group of 16 or 32 inputs, a float scale times a small integer plus a float
offset, however its block packs them: Q4_K's ``d * sc * q - dmin * m`` is scale ``d * sc``, code ``q``,
offset ``-dmin * m``; a signed code (Q4_0's ``q - 8``, Q8_0's int8, Q6_K's ``q - 32``) becomes the
unsigned one and an offset of ``-8 * scale`` (``-128 * d``, ``-32 * scale``). The conversion is exact:
ggml's fp16 scales have 11 significant bits and its sub-scales and codes few enough that every
product and the sum ``scale * code + offset`` fit float32's 24 (the tightest, Q6_K: 11 + 13 bits), so
`QuantizedWeight.dequantize` gives gguf-py's `gguf.quants.dequantize` bit for bit (a zero's sign aside:
``d * 8 - 8 * d`` is +0 where ggml's ``d * 0`` has d's sign). IQ4_NL and IQ4_XS code into a fixed table
of 16 levels, carried as the weight's `lookup`.

The unpacking is vectorised over all blocks of a weight at once (the layouts are ggml-common.h's and
gguf-py's `quants` module's).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tokenmill.interfaces import FP8_CODE_TYPES, GGMLWeight, QuantizedWeight

IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl


class _Groups(NamedTuple):
    """One weight's blocks unpacked: per block, its codes and its groups' scales and offsets."""

    code_type: str
    codes: np.ndarray  # (rows, blocks, inputs per block) uint8
    scales: np.ndarray  # (rows, blocks, groups per block) float32
    offsets: np.ndarray | None
    lookup: tuple[int, ...] | None = None


# numpy rather than torch: on uint8 bit fields it is as fast on one thread as torch is on all of them,
# and it does not slow down when the cores are busy (torch's threads wait on each other there).
_LOW4, _LOW6, _HIGH2 = np.uint8(0x0F), np.uint8(0x3F), np.uint8(0x30)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte `start` of every block, as float32 (rows, blocks, 1)."""
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16).astype(np.float32)


def _runs(data: np.ndarray, *shape: int) -> np.ndarray:
    """The last axis split into `shape`."""
    return data.reshape(data.shape[:-1] + shape)


def _flat(data: np.ndarray, axes: int) -> np.ndarray:
    """The last `axes` axes as one."""
    return data.reshape(data.shape[:-axes] + (-1,))


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Each run of bytes as its low nibbles, then its high nibbles (ggml's order for 4-bit codes)."""
    return np.concatenate([qs & _LOW4, qs >> np.uint8(4)], axis=-1)


def _fields(data: np.ndarray, shifts: Sequence[int], mask: int, axis: int) -> np.ndarray:
    """`(data >> shift) & mask` for each shift, stacked at `axis` (-1: per byte; -2: per shift)."""
    return np.stack([(data >> np.uint8(shift)) & np.uint8(mask) for shift in shifts], axis=axis)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """2-bit fields of each 32-byte run, shift by shift: element 32 * s + i is bits 2s of byte i."""
    return _flat(_fields(_runs(qs, -1, 32), range(0, 8, 2), 3, -2), 3)


def _bit_planes(mask: np.ndarray) -> np.ndarray:
    """The 8 bit planes of a 32-byte mask: element 32 * bit + i is that bit of byte i."""
    return _flat(_runs(np.unpackbits(mask, axis=-1, bitorder="little"), 32, 8).swapaxes(-1, -2), 2)


def _q4_0(b: np.ndarray) -> _Groups:
    d = _f16(b, 0)
    return _Groups("uint4", _nibbles(b[..., 2:]), d, d * np.float32(-8))


def _q4_1(b: np.ndarray) -> _Groups:
    return _Groups("uint4", _nibbles(b[..., 4:]), _f16(b, 0), _f16(b, 2))


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 32 fifth bits, shifted into place: element j's is bit j of the little-endian uint32."""
    return np.unpackbits(qh, axis=-1, bitorder="little") << np.uint8(4)


def _q5_0(b: np.ndarray) -> _Groups:
    d = _f16(b, 0)
    return _Groups("uint5", _nibbles(b[..., 6:]) | _fifth_bits(b[..., 2:6]), d, d * np.float32(-16))


def _q5_1(b: np.ndarray) -> _Groups:
    return _Groups("uint5", _nibbles(b[..., 8:]) | _fifth_bits(b[..., 4:8]), _f16(b, 0), _f16(b, 2))


def _q8_0(b: np.ndarray) -> _Groups:
    d = _f16(b, 0)  # int8 q + 128 is its byte with the sign bit flipped
    return _Groups("uint8", b[..., 2:] ^ np.uint8(0x80), d, d * np.float32(-128))


def _q2_k(b: np.ndarray) -> _Groups:
    sc, d, dmin = b[..., :16], _f16(b, 80), _f16(b, 82)
    return _Groups("uint2", _crumbs(b[..., 16:80]), d * (sc & _LOW4), -(dmin * (sc >> np.uint8(4))))


def _q3_k(b: np.ndarray) -> _Groups:
    # 16 6-bit signed scales: low nibbles of 8 bytes, then 2-bit high parts of 4 bytes, shift by shift.
    low = _nibbles(b[..., 96:104])
    high = _flat(_fields(b[..., 104:108], range(0, 8, 2), 3, -2), 2)
    scale = _f16(b, 108) * ((low | (high << np.uint8(4))).astype(np.float32) - np.float32(32))
    # ggml's q is the 2 low bits minus 4 where the mask bit is clear: code q + 4 is the two together.
    codes = _crumbs(b[..., 32:96]) | (_bit_planes(b[..., :32]) << np.uint8(2))
    return _Groups("uint3", codes, scale, scale * np.float32(-4))


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 8 6-bit scales and 8 6-bit mins from their 12 bytes."""
    d, m, m_d = (_runs(packed, 3, 4)[..., i, :] for i in range(3))
    two = np.uint8(2)
    scales = np.concatenate([d & _LOW6, (m_d & _LOW4) | ((d >> two) & _HIGH2)], axis=-1)
    mins = np.concatenate([m & _LOW6, (m_d >> np.uint8(4)) | ((m >> two) & _HIGH2)], axis=-1)
    return scales, mins


def _q4_k(b: np.ndarray) -> _Groups:
    sc, m = _k_scales(b[..., 4:16])
    codes = _flat(_nibbles(_runs(b[..., 16:], 4, 32)), 2)
    return _Groups("uint4", codes, _f16(b, 0) * sc, -(_f16(b, 2) * m))


def _q5_k(b: np.ndarray) -> _Groups:
    sc, m = _k_scales(b[..., 4:16])
    codes = _flat(_nibbles(_runs(b[..., 48:], 4, 32)), 2) | (_bit_planes(b[..., 16:48]) << np.uint8(4))
    return _Groups("uint5", codes, _f16(b, 0) * sc, -(_f16(b, 2) * m))


def _q6_k(b: np.ndarray) -> _Groups:
    low = _flat(_nibbles(_runs(b[..., :128], 2, 64)), 2)
    scale = _f16(b, 208) * b[..., 192:208].view(np.int8)
    codes = low | (_crumbs(b[..., 128:192]) << np.uint8(4))  # ggml's q - 32 as code q
    return _Groups("uint6", codes, scale, scale * np.float32(-32))


def _iq4_nl(b: np.ndarray) -> _Groups:
    return _Groups("uint4", _nibbles(b[..., 2:]), _f16(b, 0), None, IQ4_LEVELS)


def _iq4_xs(b: np.ndarray) -> _Groups:
    # 8 6-bit signed scales: group 2i + s's low 4 bits are nibble s of byte i, its high 2 the crumb g of
    # the little-endian uint16.
    low = _flat(_fields(b[..., 4:8], (0, 4), 0x0F, -1), 2)
    high = _flat(_fields(b[..., 2:4], range(0, 8, 2), 3, -1), 2)
    scale = _f16(b, 0) * ((low | (high << np.uint8(4))).astype(np.float32) - np.float32(32))
    return _Groups("uint4", _flat(_nibbles(_runs(b[..., 8:], 8, 16)), 2), scale, None, IQ4_LEVELS)


_UNPACK: dict[str, Callable[[np.ndarray], _Groups]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q2_K": _q2_k, "Q3_K": _q3_k,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs,
}
GGML_BLOCK_TYPES = frozenset(_UNPACK)


def quantized_from_ggml(weight: GGMLWeight) -> QuantizedWeight:
    """`weight`'s blocks as codes, scales and offsets; a `ValueError` for a type not in GGML_BLOCK_TYPES."""
    unpack = _UNPACK.get(weight.ggml_type)
    if unpack is None:
        raise ValueError(f"ggml type {weight.ggml_type} has no QuantizedWeight form; "
                         f"types with one: {', '.join(sorted(GGML_BLOCK_TYPES))}")
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[weight.ggml_type]]
    rows = weight.blocks.shape[0]
    blocks = weight.blocks.contiguous().numpy().reshape(rows, weight.in_features // block_size, type_size)
    groups = unpack(blocks)
    return QuantizedWeight(
        format="gguf", code_type=groups.code_type,
        codes=torch.from_numpy(groups.codes.reshape(rows, weight.in_features)),
        scales=_float32(groups.scales, rows), offsets=None if groups.offsets is None else _float32(groups.offsets, rows),
        group_size=block_size // groups.scales.shape[-1],
        lookup=None if groups.lookup is None else torch.tensor(groups.lookup, dtype=torch.float32))


def _float32(values: np.ndarray, rows: int) -> torch.Tensor:
    # Sub-scales stay small integers until multiplied by the fp16 scale, which makes them float32.
    assert values.dtype == np.float32, values.dtype
    return torch.from_numpy(np.ascontiguousarray(values.reshape(rows, -1)))


def stack_rows(weights: Sequence[QuantizedWeight]) -> QuantizedWeight | None:
    """One weight of the rows of `weights` in order: a fused layer (q, k, v) whose parts a mixed GGUF
    (Q4_K_M) stores in different types, or a checkpoint's fused shards. Groups become the finest of theirs
    (a coarser group's scale repeated), codes the widest, and IQ4 levels beside plain integers plain
    integers too (`_level_codes`): no value changes. None where they cannot (an offset beside a table, fp8
    beside integers, different act-orders)."""
    if len(weights) == 1:
        return weights[0]
    orders = [w.input_order for w in weights]
    if any((a is None) != (b is None) or (a is not None and not torch.equal(a, b)) for a, b in zip(orders, orders[1:])):
        return None
    code_types = {w.code_type for w in weights}
    if len(code_types) > 1 and code_types & set(FP8_CODE_TYPES):
        return None
    if len({None if w.lookup is None else tuple(w.lookup.tolist()) for w in weights}) > 1:
        weights = [_level_codes(w) for w in weights]
        if None in weights:
            return None
        code_types = {w.code_type for w in weights}
    group_size = min(w.group_size for w in weights)
    if any(w.group_size % group_size for w in weights):
        return None
    offsets = None
    if any(w.offsets is not None for w in weights):
        offsets = torch.cat([(w.offsets if w.offsets is not None else torch.zeros_like(w.scales))
                             .repeat_interleave(w.group_size // group_size, dim=1) for w in weights])
    return QuantizedWeight(
        format=weights[0].format,
        code_type=weights[0].code_type if len(code_types) == 1 else f"uint{max(w.bits for w in weights)}",
        codes=torch.cat([w.codes for w in weights]),
        scales=torch.cat([w.scales.repeat_interleave(w.group_size // group_size, dim=1) for w in weights]),
        offsets=offsets, group_size=group_size, input_order=orders[0], lookup=weights[0].lookup)


def _level_codes(weight: QuantizedWeight) -> QuantizedWeight | None:
    """A weight with a table of integer levels as uint8 codes `level - lowest` and offset `scale * lowest`,
    or the weight itself where it has no table. Exact for IQ4's levels (-127..113): ``d * s * 240`` and
    ``d * s * 127`` fit float32 (|s * 240| < 2 ** 13 beside fp16 d's 11 bits); None for another table."""
    levels = weight.lookup
    if levels is None:
        return weight
    lowest = levels.min()
    if weight.offsets is not None or not torch.equal(levels, levels.round()) or levels.max() - lowest > 255:
        return None
    codes = (levels - lowest).to(torch.uint8)[weight.codes.long()]
    return QuantizedWeight(weight.format, "uint8", codes, weight.scales, weight.scales * lowest, weight.group_size)
