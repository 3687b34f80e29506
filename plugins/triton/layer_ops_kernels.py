"""Fused elementwise kernels for `tokenmill.interfaces.LayerOps`: RMSNorm (+ residual), RoPE, SiLU-and-mul.

Each computes in float32 and rounds once to the tensor's dtype, where the PyTorch reference rounds
after every op: the results agree to the dtype's rounding, which is what the conformance suite allows.
Row indices are widened to int64 because rows x row stride passes 2**31 on long prompts of wide models.
Extents that are not powers of two (hidden 96, intermediate 80, 40 heads) are padded and masked.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr,
    rows_per_outer, stride_x_outer, stride_x_inner, stride_r_outer, stride_r_inner,
    eps, offset,
    N: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """One program per row of N values; outputs are contiguous.

    A row of x sits at ``outer * stride_x_outer + inner * stride_x_inner``, so a (tokens, heads,
    head_dim) view cut out of a fused projection is normalised per head without a copy.
    """
    row = tl.program_id(0).to(tl.int64)
    outer = row // rows_per_outer
    inner = row % rows_per_outer
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + outer * stride_x_outer + inner * stride_x_inner + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + outer * stride_r_outer + inner * stride_r_inner + cols, mask=mask, other=0.0)
        # The sum is rounded to the dtype before normalising, as the reference does: it is also the
        # next layer's residual, so both must be the same numbers.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * N + cols, x, mask=mask)
    h = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, (h * inv_rms * (w + offset)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotary_kernel(
    positions_ptr, query_ptr, key_ptr, cos_ptr, sin_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cos, stride_sin,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PADDED: tl.constexpr,
    KV_HEADS_PADDED: tl.constexpr, HALF: tl.constexpr, HALF_PADDED: tl.constexpr,
):
    """One program per token rotates all its query and key heads in place (rotate-half RoPE).

    With x = (x1, x2) the two halves of a head: out = (x1 cos1 - x2 sin1, x2 cos2 + x1 sin2), cos and
    sin being the halves of the token's table row (equal halves in practice, not assumed).
    """
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    j = tl.arange(0, HALF_PADDED)
    j_valid = j < HALF
    cos1 = tl.load(cos_ptr + pos * stride_cos + j, mask=j_valid, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + pos * stride_cos + HALF + j, mask=j_valid, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + pos * stride_sin + j, mask=j_valid, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + pos * stride_sin + HALF + j, mask=j_valid, other=0.0).to(tl.float32)[None, :]

    h = tl.arange(0, HEADS_PADDED)[:, None]
    mask = (h < NUM_HEADS) & j_valid[None, :]
    first = query_ptr + token * stride_q_tok + h * stride_q_head + j[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos1 - x2 * sin1).to(query_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos2 + x1 * sin2).to(query_ptr.dtype.element_ty), mask=mask)

    h = tl.arange(0, KV_HEADS_PADDED)[:, None]
    mask = (h < NUM_KV_HEADS) & j_valid[None, :]
    first = key_ptr + token * stride_k_tok + h * stride_k_head + j[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos1 - x2 * sin1).to(key_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos2 + x1 * sin2).to(key_ptr.dtype.element_ty), mask=mask)


@triton.jit
def silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_in_row, n, BLOCK: tl.constexpr):
    """Grid (rows, cdiv(n, BLOCK)): ``silu(gate) * up`` for gate, up the halves of a 2n-wide row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(gate_up_ptr + row * stride_in_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in_row + n + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)
