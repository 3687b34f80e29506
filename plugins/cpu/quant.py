"""Linear-layer methods of the CPU backend.

- `PackedBF16Linear`: dense bf16 weights packed for the AVX512-BF16 kernel in csrc/gemm_kernels.h, the
  default where the CPU has AVX512-BF16 (on AVX2 alone, csrc/avx2_gemm.h runs the same panels in float32
  arithmetic: 3.9x `F.linear`'s float32 at one row on a Zen 1 EPYC, NOTES section 35; and a GGUF's Q4_1 and
  Q8_0 blocks at one row against int16 activations, 1.3-1.4x those panels there, section 36).
  Measured against oneDNN's packed weights over SmolLM2-135M's
  linears: 1.8x faster at one token, ~1.2x at 16 to 64, 1.07x at 512, with the same results. Where the CPU
  has AMX (Sapphire Rapids on) the same packed weights run on its tiles (csrc/amx_gemm.h): on a Xeon
  with AMX, 1.4x oneDNN (which takes AMX too) and 5x AVX512-BF16 at 64 rows, 2.6x AVX512-BF16 at 16. A GGUF
  checkpoint's Q4_1 and Q8_0 weights it also runs from their own blocks below `GGML_MAX_ROWS` rows: a
  third (Q8_0: half) of the bytes, and the exact dequantized weight rather than its bf16 rounding (Q4_1:
  2x faster at one token, 1.15x at 16; slower from ~32 rows, where the dense copy takes over). Rows a step
  marks as decodes (`tokenmill.batch_rows`) choose by their own count and the prompt rows beside them take
  the many-row kernel, so a decode's numbers do not depend on the prompts sharing its step.
  A checkpoint's pre-quantized weights (`QuantizedWeight`: GPTQ, AWQ, fp8, compressed-tensors, GGUF) it
  runs from codes packed once by `pack_grouped` (csrc/grouped_kernels.h): 4-bit codes (uint2..uint4, IQ4's
  table) at 0.5 bytes a weight, uint5 at 0.625, uint6 at 0.75, uint7, uint8 and fp8 at 1, plus the
  scales and offsets of each group (fp16 where all are exact in fp16: uint4 group 32 at Q4_1's 0.625
  bytes a weight, and as fast; no offsets where each is -z scale: Q5_0 at its own 0.6875). From
  32 rows (GROUPED_MAX_ROWS) the kernel dequantizes each panel to bf16 in cache and runs the dense kernel:
  no dense copy is kept.
- `OneDNNPackedLinear`: dense bf16 weights pre-packed once into oneDNN's blocked layout, for CPUs
  with AVX-512 but not AVX512-BF16 (an AVX2-only CPU takes the AVX2 panels, or `F.linear` without the
  build). At decode sizes `F.linear` re-lays the weight out on every call; the packed form reads it at
  memory speed (2x faster at one token, ~1.3x at 16 to 64), identical to `F.linear`.
- `Int8ActivationLinear` (`--quantize int8-activations`, where the CPU has AVX512-VNNI): a GGUF's Q4_1 and
  Q8_0 blocks run, from 8 rows, against activations quantized to int8 per 32 inputs (llama.cpp's
  arithmetic; vpdpbusd does twice vdpbf16ps's multiply-adds), and no dense copy is kept: at 64 decode
  streams of SmolLM2 1.2-1.3x the tokens a second, for a perplexity 1.9 % higher (benchmarks/NOTES.md
  section 23). Other weights run as `PackedBF16Linear` runs them.
- `Int8WeightOnly` (`--quantize int8`): per-channel int8 weights through `aten._weight_int8pack_mm`.
- `DequantizedFloatLinear`: a pre-quantized checkpoint's weights dequantized once to float32 and run by
  `F.linear`: how an fp32 (or fp16) model runs GPTQ, AWQ, fp8 and compressed-tensors checkpoints, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill import batch_rows
from tokenmill.interfaces import FP8_CODE_TYPES, GGMLWeight, QuantizedWeight, QuantMethod

try:
    from tokenmill.plugins.cpu import _bf16_gemm
except ImportError:  # pragma: no cover - depends on the build
    _bf16_gemm = None

LANES = 16  # output features per packed weight vector
GGML_BLOCK = 32  # inputs per Q4_1 block (fp16 d, fp16 m, 16 bytes of nibbles) and Q8_0 block (fp16 d, 32 int8)


def _ggml_max_rows() -> int:
    """From how many rows the dense copy is faster than a GGUF's blocks (benchmarks.micro.linears): from 32 on
    AVX512-BF16; from 8 on AMX tiles, which multiply 16 rows at once (4 rows: as fast as the blocks); from 2
    on AVX2 alone (csrc/avx2_gemm.h), where both are bound by arithmetic and the blocks win at one row only."""
    if _bf16_gemm is None:
        return 32
    if _bf16_gemm.amx():
        return 8
    return 32 if _bf16_gemm.blocks() else 2


GGML_MAX_ROWS = _ggml_max_rows()
DENSE_FORMAT = 0  # gemm_kernels.h's GEMM_DENSE
GROUPED_FORMAT = 3  # gemm_kernels.h's GEMM_GROUPED
CHECKPOINT_FORMATS = frozenset({"gptq", "awq", "fp8", "compressed-tensors", "gguf"})


@dataclass(frozen=True)
class GGMLFormat:
    """A ggml type the AVX512-BF16 kernels read (csrc/gemm_kernels.h)."""

    code: int  # gemm_kernels.h's GEMM_Q4_1 / GEMM_Q8_0
    int8_code: int  # the same blocks against int8 activations from many rows: GEMM_Q4_1_INT8 / GEMM_Q8_0_INT8
    tiles_code: int  # the same blocks dequantized onto AMX tiles: GEMM_Q4_1_TILES / GEMM_Q8_0_TILES
    file_block_bytes: int  # one block of 32 inputs in the GGUF
    packed_block_bytes: int  # one panel's block (16 outputs x 32 inputs) packed


GGML_FORMATS = {"Q4_1": GGMLFormat(1, 4, 6, 20, 320), "Q8_0": GGMLFormat(2, 5, 7, 34, 544)}


def bf16_gemm_available() -> bool:
    return _bf16_gemm is not None and _bf16_gemm.available()


def block_kernels_available() -> bool:
    """Whether a checkpoint's grouped codes run from their own packed form (AVX512-BF16); on AVX2
    (csrc/avx2_gemm.h) they are dequantized once into the dense layout."""
    return bf16_gemm_available() and _bf16_gemm.blocks()


def ggml_kernels_available() -> bool:
    """Whether a GGUF's Q4_1 and Q8_0 blocks run from their own packed form: on AVX512-BF16, and on AVX2
    against int16 activations (csrc/avx2_gemm.h)."""
    return bf16_gemm_available() and _bf16_gemm.ggml_blocks()


def amx_available() -> bool:
    """Whether dense bf16 weights and GGUF blocks run on AMX tiles (csrc/amx_gemm.h): a CPU with AMX, a build
    for it, and not TOKENMILL_CPU_AMX=0."""
    return bf16_gemm_available() and _bf16_gemm.amx()


def int8_activations_available() -> bool:
    """Whether this build runs ggml blocks against int8 activations (AVX512-VNNI)."""
    return bf16_gemm_available() and _bf16_gemm.int8_rows() is not None


@dataclass(frozen=True)
class PackedBF16Weight:
    packed: torch.Tensor  # (out_pad / 16, in_pad / 2, 16, 2) bf16
    out_features: int
    in_features: int


@dataclass(frozen=True)
class PackedGGMLWeight:
    format: GGMLFormat
    packed: torch.Tensor  # (out_pad / 16, in / 32, bytes per block) uint8, see pack_ggml
    dense: PackedBF16Weight | None  # the dense copy many rows take, where kept
    out_features: int
    in_features: int
    # gemm_kernels.h's formats below GGML_MAX_ROWS rows and from there: the blocks, then the dense copy
    # (DENSE_FORMAT) or, on AMX, the blocks dequantized onto tiles; int8 activations: their code at both.
    codes: tuple[int, int]

    def kernel_code(self, rows: int) -> int:
        """gemm_kernels.h's format for `rows` rows of x."""
        return self.codes[rows >= GGML_MAX_ROWS]

    def kernel_weight(self, rows: int) -> PackedBF16Weight | PackedGGMLWeight:
        """What the kernel for `rows` rows reads: the dense copy, or these blocks."""
        return self.dense if self.kernel_code(rows) == DENSE_FORMAT else self


def pack_ggml(ggml_format: GGMLFormat, blocks: torch.Tensor) -> torch.Tensor:
    """Rows of ggml blocks (out, in / 32 * file block bytes) in the panel layout of csrc/gemm_kernels.h.

    Per panel of 16 outputs and block of 32 inputs: the 16 fp16 d (Q4_1: then the 16 fp16 m), then
    the weights so that one 512-bit vector is 16 outputs x 2 inputs, output o's pair at 2o, 2o + 1.
    Q8_0: 16 pairs of 32 int8. Q4_1: 4 chunks of 32 16-bit words, nibble s of word 2o + i in chunk c
    the q of output o, input 2 (4c + s) + i, so a shift and a mask give one input pair's vector.
    """
    out_features, num_blocks = blocks.shape[0], blocks.shape[1] // ggml_format.file_block_bytes
    blocks = blocks.contiguous()
    packed = torch.empty(-(-out_features // LANES), num_blocks, ggml_format.packed_block_bytes, dtype=torch.uint8)
    _bf16_gemm.pack_ggml(ggml_format.code, blocks.data_ptr(), packed.data_ptr(), out_features, num_blocks)
    return packed


@dataclass(frozen=True)
class PackedGroupedWeight:
    packed: torch.Tensor  # uint8: header, input order, panels (csrc/grouped_kernels.h)
    out_features: int
    in_features: int


# grouped_kernels.h's kinds of codes and the header's layout.
GROUPED_U4, GROUPED_LUT4, GROUPED_I8, GROUPED_FP8, GROUPED_U7, GROUPED_U5, GROUPED_U6 = range(7)
GROUPED_HEADER_BYTES = 320
GROUPED_TABLE_AT = 64


def _exact_in_bf16(values: torch.Tensor) -> bool:
    return bool((values.float().to(torch.bfloat16).float() == values.float()).all())


def grouped_kind(weight: QuantizedWeight) -> int | None:
    """The kernel's kind of codes for `weight`, or None where it has none (inputs not a multiple of 16, a
    table of values not exact in bf16 or of more than 16 entries)."""
    if weight.in_features % 16 or weight.group_size % 16:
        return None
    if weight.code_type in FP8_CODE_TYPES:
        return GROUPED_FP8
    if weight.lookup is not None:
        return GROUPED_LUT4 if weight.bits <= 4 and _exact_in_bf16(weight.lookup) else None
    # uint2 and uint3 take 4 bits (unpacking them costs more than the bytes saved); uint5 and uint6 their own
    # 5 or 6 bits, uint7 a byte.
    return {5: GROUPED_U5, 6: GROUPED_U6, 7: GROUPED_U7, 8: GROUPED_I8}.get(weight.bits, GROUPED_U4)


def _bf16_bits(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.bfloat16).view(torch.int16)


def _exact_in_fp16(values: torch.Tensor | None) -> bool:
    return values is None or bool((values.half().float() == values).all())


def _zero_point(scales: torch.Tensor, offsets: torch.Tensor) -> int | None:
    """z where every offset is exactly -z scale (GGUF's Q4_0, Q5_0 and Q6_K, symmetric GPTQ), else None."""
    nonzero = scales != 0
    if not nonzero.any():
        return None
    zero = -float(offsets[nonzero].flatten()[0] / scales[nonzero].flatten()[0])
    if zero != round(zero) or not 0 <= zero <= 255:
        return None
    return int(zero) if torch.equal(offsets, -zero * scales) else None


def _grouped_code_bytes(kind: int, group_size: int) -> int:
    """Bytes of one (panel of 16 outputs, group)'s codes, as csrc/grouped_kernels.h lays them out."""
    if kind in (GROUPED_U5, GROUPED_U6):  # streams of 5 or 6 bits a lane, per unit of 16 pairs (8 in groups of 16)
        bits, unit_pairs = (5 if kind == GROUPED_U5 else 6), 8 if group_size % 32 else 16
        return group_size // 2 // unit_pairs * -(-bits * unit_pairs // 16) * 64
    return group_size * (8 if kind in (GROUPED_U4, GROUPED_LUT4) else 16)


def pack_grouped(weight: QuantizedWeight, kind: int) -> PackedGroupedWeight:
    """`weight` in the layout of csrc/grouped_kernels.h: the checkpoint's scales and offsets (fp16 where all
    are exact in fp16, as GGUF's legacy types' and symmetric GPTQ's are: a quarter fewer bytes at 4 bits,
    group 32; no offsets where all are -z scale, the kernel moving by z), the codes as the kernel reads
    them (I8: q - 128 as int8, the kernel moving the offsets)."""
    codes, scales = weight.codes.to(torch.uint8), weight.scales.float()
    offsets = None if weight.offsets is None else weight.offsets.float()
    zero = 0 if offsets is None else _zero_point(scales, offsets)
    if zero is None:
        zero = 0
    else:
        offsets = None
    table = torch.zeros(128, dtype=torch.int16)
    if kind == GROUPED_I8:
        codes = (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
    elif kind == GROUPED_LUT4:
        table[:len(weight.lookup)] = _bf16_bits(weight.lookup.float())
    elif kind == GROUPED_FP8:
        magnitudes = torch.arange(128, dtype=torch.uint8).view(FP8_CODE_TYPES[weight.code_type])
        table[:] = _bf16_bits(magnitudes.float())
    half = _exact_in_fp16(scales) and _exact_in_fp16(offsets)
    if half:
        scales, offsets = scales.half(), None if offsets is None else offsets.half()
    order = weight.input_order
    order_bytes = 0 if order is None else -(-4 * weight.in_features // 64) * 64
    groups = weight.in_features // weight.group_size
    scale_bytes = 32 if half else 64
    code_bytes = _grouped_code_bytes(kind, weight.group_size)
    group_bytes = scale_bytes * (1 + (offsets is not None)) + code_bytes
    packed = torch.zeros(GROUPED_HEADER_BYTES + order_bytes + -(-weight.out_features // LANES) * groups * group_bytes,
                         dtype=torch.uint8)
    packed[:28].view(torch.int32)[:] = torch.tensor(
        [kind, weight.group_size, offsets is not None, order is not None, weight.in_features, half, zero],
        dtype=torch.int32)
    packed[GROUPED_TABLE_AT:GROUPED_HEADER_BYTES].view(torch.int16)[:] = table
    if order is not None:
        packed[GROUPED_HEADER_BYTES:GROUPED_HEADER_BYTES + 4 * weight.in_features].view(torch.int32)[:] = order
    codes, scales = codes.contiguous(), scales.contiguous()
    offsets = None if offsets is None else offsets.contiguous()
    _bf16_gemm.pack_grouped(codes.data_ptr(), scales.data_ptr(), 0 if offsets is None else offsets.data_ptr(),
                            packed.data_ptr(), weight.out_features)
    return PackedGroupedWeight(packed, weight.out_features, weight.in_features)


class PackedBF16Linear(QuantMethod):
    """Unquantized bf16 weights, packed so each 512-bit load is 16 outputs x 2 inputs (`vdpbf16ps`)."""

    name = "avx512-bf16"
    checkpoint_formats = CHECKPOINT_FORMATS

    def prepare_quantized(self, weight: QuantizedWeight) -> PackedGroupedWeight | PackedBF16Weight:
        kind = grouped_kind(weight)
        if kind is None or not block_kernels_available():
            return self.prepare(weight.dequantize())
        return pack_grouped(weight, kind)

    def dequantize(self, prepared) -> torch.Tensor | None:
        if not isinstance(prepared, PackedGroupedWeight):
            return None
        weight = torch.empty(prepared.out_features, prepared.in_features)
        _bf16_gemm.unpack_grouped(prepared.packed.data_ptr(), weight.data_ptr(), prepared.out_features)
        return weight

    def prepare_ggml(self, weight: torch.Tensor, ggml: GGMLWeight) -> PackedGGMLWeight | None:
        ggml_format = GGML_FORMATS.get(ggml.ggml_type)
        if ggml_format is None or ggml.in_features % GGML_BLOCK or not ggml_kernels_available():
            return None
        dense, codes = self._many_rows(weight, ggml_format)
        return PackedGGMLWeight(ggml_format, pack_ggml(ggml_format, ggml.blocks), dense, weight.shape[0],
                                ggml.in_features, codes)

    def _many_rows(self, weight: torch.Tensor, ggml_format: GGMLFormat) -> tuple[PackedBF16Weight | None, tuple[int, int]]:
        """How many rows run a weight's ggml blocks: on AMX, the blocks dequantized onto the tiles (the dense
        copy's values, a third of its bytes, and none kept); else a dense copy kept beside them."""
        if amx_available():
            return None, (ggml_format.code, ggml_format.tiles_code)
        return self.prepare(weight), (ggml_format.code, DENSE_FORMAT)

    def prepare(self, weight: torch.Tensor) -> PackedBF16Weight:
        out_features, in_features = weight.shape
        padded = weight.detach().to(torch.bfloat16).contiguous()
        if in_features % 2 or out_features % LANES:  # a zero-padded copy only where the panels need one
            padded = F.pad(padded, (0, in_features % 2, 0, -out_features % LANES))
        rows, cols = padded.shape
        # The packed copy is the only one made: a bf16 weight is packed with one weight-sized transient.
        packed = padded.view(rows // LANES, LANES, cols // 2, 2).permute(0, 2, 1, 3).contiguous()
        return PackedBF16Weight(packed, out_features, in_features)

    def rows(self, prepared: PackedBF16Weight | PackedGGMLWeight | PackedGroupedWeight, ids: torch.Tensor
             ) -> torch.Tensor | None:
        if isinstance(prepared, PackedGGMLWeight):
            prepared = prepared.dense  # None without a dense copy
        if not isinstance(prepared, PackedBF16Weight):
            return None  # the embedding keeps its own weight
        # Row r is lane r % 16 of panel r // 16: one 32-bit word (an input pair) in every 16 along the panel.
        # Each word lies on its own cache line: 64 ids of the 1B's head take ~0.1 ms (a dense lookup 5 us), a
        # thousandth of its decode step at 64 streams, at most.
        pairs = prepared.packed.shape[1]
        words = prepared.packed.view(torch.int32).view(-1)
        first = ids // LANES * (pairs * LANES) + ids % LANES
        picked = torch.take(words, first[:, None] + torch.arange(pairs, device=ids.device) * LANES)
        return picked.view(torch.bfloat16)[:, :prepared.in_features].contiguous()

    def serialize(self, prepared: PackedBF16Weight | PackedGGMLWeight | PackedGroupedWeight
                  ) -> dict[str, torch.Tensor]:
        if isinstance(prepared, PackedGroupedWeight):
            return {"grouped": prepared.packed, "shape": torch.tensor([prepared.out_features, prepared.in_features])}
        tensors = {"shape": torch.tensor([prepared.out_features, prepared.in_features])}
        dense = prepared.dense if isinstance(prepared, PackedGGMLWeight) else prepared
        if dense is not None:
            tensors["dense"] = dense.packed
        if isinstance(prepared, PackedGGMLWeight):
            tensors.update(blocks=prepared.packed, format=torch.tensor([prepared.format.code]),
                           codes=torch.tensor(prepared.codes))
        return tensors

    def deserialize(self, tensors: dict[str, torch.Tensor]) -> PackedBF16Weight | PackedGGMLWeight | PackedGroupedWeight:
        out_features, in_features = tensors["shape"].tolist()
        if "grouped" in tensors:
            return PackedGroupedWeight(tensors["grouped"], out_features, in_features)
        dense = PackedBF16Weight(tensors["dense"], out_features, in_features) if "dense" in tensors else None
        if "blocks" not in tensors:
            return dense
        code = int(tensors["format"])
        ggml_format = next(f for f in GGML_FORMATS.values() if f.code == code)
        codes = tuple(tensors["codes"].tolist())
        return PackedGGMLWeight(ggml_format, tensors["blocks"], dense, out_features, in_features, codes)

    def matmul(self, x: torch.Tensor, prepared: PackedBF16Weight | PackedGGMLWeight | PackedGroupedWeight
               ) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if prepared.in_features % 2:
            x = F.pad(x, (0, 1))
        x = x.contiguous()
        y = x.new_empty(x.shape[0], prepared.out_features)
        # A GGUF's blocks and a checkpoint's grouped codes change kernels with the row count: decode rows
        # choose by their own count, prompt rows beside them take the many-row kernel (tokenmill.batch_rows).
        decodes = None if isinstance(prepared, PackedBF16Weight) else batch_rows.decode_rows(x.shape[0])
        if decodes is None or decodes == x.shape[0]:
            _linear_rows(x, prepared, y, x.shape[0])
        else:
            if decodes:
                _linear_rows(x[:decodes], prepared, y[:decodes], decodes)
            _linear_rows(x[decodes:], prepared, y[decodes:], GGML_MAX_ROWS)
        return y


def _linear_rows(x: torch.Tensor, prepared: PackedBF16Weight | PackedGGMLWeight | PackedGroupedWeight,
                 y: torch.Tensor, kernel_rows: int) -> None:
    """y = x @ W^T into `y`, by the kernel the weight takes at `kernel_rows` rows (grouped codes: at x's own)."""
    weight_format = DENSE_FORMAT
    if isinstance(prepared, PackedGroupedWeight):
        weight_format = GROUPED_FORMAT
    elif isinstance(prepared, PackedGGMLWeight):
        weight_format = prepared.kernel_code(kernel_rows)
        prepared = prepared.kernel_weight(kernel_rows)
    _bf16_gemm.linear(weight_format, x.data_ptr(), prepared.packed.data_ptr(), y.data_ptr(), x.shape[0],
                      prepared.out_features, x.shape[1] // 2, x.stride(0), y.stride(0), torch.get_num_threads())


class Int8ActivationLinear(PackedBF16Linear):
    """`--quantize int8-activations`: a GGUF's Q4_1 and Q8_0 blocks against int8 activations from 8 rows
    (csrc/gemm_kernels.h), with no dense copy; every other weight as `PackedBF16Linear` runs it.

    Not the default: quantizing the activations costs SmolLM2 1.9 % of perplexity (its bf16 drift is
    0.06 %), for 1.2-1.3x the throughput at 64 streams. llama.cpp computes these types this way at every
    batch size.
    """

    name = "int8-activations"
    # A GGUF's other block types (Q4_K_M's Q5_0, Q4_K, Q6_K) run as the default method runs them, from their
    # codes; a GPTQ, AWQ or fp8 checkpoint is refused with it (it names another format than the checkpoint's).
    checkpoint_formats = frozenset({"gguf"})

    def matmul(self, x: torch.Tensor, prepared) -> torch.Tensor:
        if x.dtype != torch.bfloat16 and isinstance(prepared, PackedGroupedWeight):
            return F.linear(x, self.dequantize(prepared).to(x.dtype))  # a float32 model: the codes' exact weight
        return super().matmul(x, prepared).to(x.dtype)

    def _many_rows(self, weight: torch.Tensor, ggml_format: GGMLFormat) -> tuple[None, tuple[int, int]]:
        return None, (ggml_format.int8_code, ggml_format.int8_code)  # the kernel switches at INT8_MIN_ROWS


def onednn_linear_available() -> bool:
    # oneDNN packs bf16 weights only where the CPU converts bf16 itself (AVX512BW/VL/DQ or AVX-NE-CONVERT):
    # on an AVX2-only CPU (AMD Zen 1-3, Intel before Skylake-X) its reorder raises: bf16 takes the AVX2 panels
    # there (csrc/avx2_gemm.h), or F.linear in a build without the C extensions.
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class OneDNNPackedLinear(QuantMethod):
    """Unquantized bf16 weights in oneDNN's packed layout (what torch.compile's CPU backend uses too)."""

    name = "onednn-bf16"
    checkpoint_formats = CHECKPOINT_FORMATS

    def prepare_quantized(self, weight: QuantizedWeight) -> torch.Tensor:
        # No kernel of its own for codes: the dequantized weight, rounded to bf16 once, on the dense path.
        return self.prepare(weight.dequantize(torch.bfloat16))

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        # The batch-size hint only picks a blocking; measured here, the same speed at 1 to 512 rows.
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)

    def matmul(self, x: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), prepared, None, "none", [], "")


@dataclass(frozen=True)
class Int8Weight:
    weight: torch.Tensor  # (out_features, in_features) int8
    scales: torch.Tensor  # (out_features,) per-channel, in the activation dtype


class Int8WeightOnly(QuantMethod):
    """Symmetric per-output-channel int8 weights; activations stay in their float dtype.

    Halves the bytes a bf16 decode step reads, which is what bounds batch-1 decoding on a CPU.
    """

    name = "int8"

    def prepare(self, weight: torch.Tensor) -> Int8Weight:
        w = weight.float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
        return Int8Weight(q.contiguous(), scales.to(weight.dtype))

    def serialize(self, prepared: Int8Weight) -> dict[str, torch.Tensor]:
        return {"weight": prepared.weight, "scales": prepared.scales}

    def deserialize(self, tensors: dict[str, torch.Tensor]) -> Int8Weight:
        return Int8Weight(tensors["weight"], tensors["scales"])

    def matmul(self, x: torch.Tensor, prepared: Int8Weight) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, prepared.weight, prepared.scales.to(x.dtype))


class DequantizedFloatLinear(QuantMethod):
    """A pre-quantized checkpoint's weights dequantized once to float32, run by `F.linear` in the
    activations' dtype: the exact checkpoint weights for an fp32 model (whose linears stay on `F.linear`,
    the kernel the reference results come from), at 4 bytes a weight. Dense weights it keeps as they are,
    so `--quantize float` is the unquantized model."""

    name = "float"
    checkpoint_formats = CHECKPOINT_FORMATS

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def prepare_quantized(self, weight: QuantizedWeight) -> torch.Tensor:
        return weight.dequantize(torch.float32)

    def matmul(self, x: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return F.linear(x, prepared if prepared.dtype == x.dtype else prepared.to(x.dtype))

    def dequantize(self, prepared: torch.Tensor) -> torch.Tensor:
        return prepared
