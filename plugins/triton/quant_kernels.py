"""Triton matmuls `y = x @ W.T` over quantized weights, dequantized tile by tile inside the kernel.

One shape for all three: a program owns a (BLOCK_M, BLOCK_N) tile of y and walks the inputs in
BLOCK_K steps, accumulating in float32. The weight's stored values (int8, int4 minus its zero
point, fp8) are exact in the activation dtype, so `tl.dot` multiplies them without rounding and the
scales are applied to the float32 partial sums. That is more exact than `F.linear` with the
dequantized weight, which rounds every `q * scale` to bf16/fp16 first.

Weight layouts (as `quant.py` prepares them):
- int8: (N, K) int8, scales (N,) float32; w = q * s.
- int4: (N, K / 2) uint8, input 2i in the low nibble, 2i + 1 in the high one; scales and zero
  points (K / GROUP, N), float32 and uint8; w = (q - z) * s.
- fp8: (N, K) float8_e4m3fn passed as its uint8 bits, scales (N,) float32; w = fp8(q) * s. The bits
  are rebuilt into fp16 by shifts, not by a `float8e4nv` cast, which Triton allows only on sm_89+:
  this kernel is the path for GPUs without fp8 matmul, and for the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.plugins.triton.interpret import interpreting


# Each kernel reads top to bottom on its own, with no @triton.jit helpers: under the interpreter those
# are objects Triton's compiler cannot read, and `aot.py` compiles the kernels from there.
# DOT_F32 (the interpreter on bf16, whose tl.dot is wrong there) multiplies in float32; "ieee" keeps
# float32 activations from dropping to tf32, which would make the result less exact than F.linear.
# Row offsets are int64: a vocabulary-sized weight or output can pass 2**31 elements.


@triton.jit
def int8_matmul_kernel(X, W, S, Y, M, N, K, stride_xm, stride_xk, stride_wn, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_F32: tl.constexpr):
    dot_dtype = tl.float32 if DOT_F32 else X.dtype.element_ty
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
        q = tl.load(W + offs_n[None, :] * stride_wn + k[:, None], mask=(k[:, None] < K) & (offs_n[None, :] < N),
                    other=0)
        acc = tl.dot(x.to(dot_dtype), q.to(dot_dtype), acc, input_precision="ieee")
    s = tl.load(S + offs_n, mask=offs_n < N, other=0.0)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], (acc * s[None, :]).to(Y.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def int4_matmul_kernel(X, W, S, Z, Y, M, N, K, stride_xm, stride_xk, stride_wn, stride_ym,
                       GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    # BLOCK_K divides GROUP_SIZE and K is a multiple of GROUP_SIZE: each K step lies in one group,
    # so the integer tile (q - z) goes through tl.dot exactly and its group's scale is applied after.
    dot_dtype = tl.float32 if DOT_F32 else X.dtype.element_ty
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
        packed = tl.load(W + offs_n[None, :] * stride_wn + k[:, None] // 2, mask=n_mask[None, :], other=0)
        q = (packed.to(tl.int32) >> ((k[:, None] % 2) * 4)) & 0xF
        group = k0 // GROUP_SIZE
        z = tl.load(Z + group * N + offs_n, mask=n_mask, other=0).to(tl.int32)
        s = tl.load(S + group * N + offs_n, mask=n_mask, other=0.0)
        acc += tl.dot(x.to(dot_dtype), (q - z[None, :]).to(dot_dtype), input_precision="ieee") * s[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=(offs_m[:, None] < M) & n_mask[None, :])


@triton.jit
def fp8_matmul_kernel(X, W, S, Y, M, N, K, stride_xm, stride_xk, stride_wn, stride_ym,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_F32: tl.constexpr):
    dot_dtype = tl.float32 if DOT_F32 else X.dtype.element_ty
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
        bits = tl.load(W + offs_n[None, :] * stride_wn + k[:, None], mask=(k[:, None] < K) & (offs_n[None, :] < N),
                       other=0).to(tl.int32)
        # The 7 exponent and mantissa bits moved into an fp16 (bias 15, not 7) read as the value
        # times 2**-8, subnormals included; the 2**8 is folded into the scale below.
        w = (((bits & 0x7F) << 7) | ((bits & 0x80) << 8)).to(tl.uint16).to(tl.float16, bitcast=True)
        acc = tl.dot(x.to(dot_dtype), w.to(dot_dtype), acc, input_precision="ieee")
    s = tl.load(S + offs_n, mask=offs_n < N, other=0.0) * 256.0
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], (acc * s[None, :]).to(Y.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def tile_sizes(num_tokens: int, max_block_k: int = 64) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for a batch of `num_tokens` rows; every one >= 16 for `tl.dot`.

    Decode batches get narrow N tiles, so a layer spreads over more programs than rows would allow.
    """
    block_m = 16 if num_tokens <= 16 else 32 if num_tokens <= 32 else 64
    block_n = 32 if num_tokens <= 16 else 64
    return block_m, block_n, min(64, max_block_k)


def _launch(kernel, x: torch.Tensor, weight: torch.Tensor, out_features: int, *args,
            max_block_k: int = 64, **constexprs) -> torch.Tensor:
    num_tokens, in_features = x.shape
    # Two faults of Triton 3.9's interpreter with bfloat16: tl.dot returns garbage, and casts from
    # float32 truncate instead of rounding to nearest (twice the rounding error of a GPU). So there
    # the kernel multiplies in float32 and writes float32, and torch rounds the result.
    interpreted_bf16 = interpreting() and x.dtype == torch.bfloat16
    y = x.new_empty(num_tokens, out_features, dtype=torch.float32 if interpreted_bf16 else x.dtype)
    if num_tokens == 0 or out_features == 0:
        return y.to(x.dtype)
    block_m, block_n, block_k = tile_sizes(num_tokens, max_block_k)
    grid = (triton.cdiv(num_tokens, block_m), triton.cdiv(out_features, block_n))
    kernel[grid](x, weight, *args, y, num_tokens, out_features, in_features, x.stride(0), x.stride(1),
                 weight.stride(0), y.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                 DOT_F32=interpreted_bf16, **constexprs)
    return y.to(x.dtype)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x @ (weight * scales[:, None]).T`: x (M, K) float, weight (N, K) int8, scales (N,) float32."""
    return _launch(int8_matmul_kernel, x, weight, weight.shape[0], scales)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """`x @ W.T` with W (N, K) from nibbles (N, K / 2) uint8, scales and zero points (K / group, N)."""
    return _launch(int4_matmul_kernel, x, packed, packed.shape[0], scales, zeros, max_block_k=group_size,
                   GROUP_SIZE=group_size)


def fp8_matmul(x: torch.Tensor, weight_bits: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x @ (fp8(weight_bits) * scales[:, None]).T`: weight_bits (N, K) uint8 holding e4m3fn values."""
    return _launch(fp8_matmul_kernel, x, weight_bits, weight_bits.shape[0], scales)
