"""The kernels as `torch.library` custom ops (namespace ``tokenmill_triton``) with fake implementations.

Custom ops keep each launch opaque to `torch.compile` and to CUDA-graph capture, and their fakes give
shapes alone, so a whole model step traces on the ``meta`` device. (`torch.library.triton_op` would let
the compiler see inside, but it fails under `torch.compile` when the kernels run in the interpreter,
which is how they are tested.) Launchers never read a device tensor on the host and never name a
device type: host-side sizes such as `max_query_len` arrive as Python ints from the step's metadata.

Each op is called as a plain function (``ops.rms_norm(x, weight, eps, offset)``), which dispatches
through ``torch.ops.tokenmill_triton.*``; `TritonLayerOps` and `TritonPagedAttention` are the wrappers
the models see. The `*_constexprs` functions are the one place the compile-time parameters are chosen; `aot.py` builds
its launch configurations from them, so what is compiled ahead of time is what the launchers run.
"""

from typing import Optional

import torch
import triton

from tokenmill.plugins.triton.attention_kernels import (
    paged_decode_kernel,
    ragged_paged_attention_kernel,
    write_kv_cache_kernel,
)
from tokenmill.plugins.triton.interpret import interpreting, next_power_of_2
from tokenmill.plugins.triton.layer_ops_kernels import rms_norm_kernel, rotary_kernel, silu_and_mul_kernel

RAGGED_BLOCK_M = 16  # query rows per program; tl.dot needs >= 16 on every side when compiled
SILU_BLOCK = 1024  # columns per program: an intermediate size of 14,336 takes 14 programs a row


def write_kv_cache_constexprs(num_kv_heads: int, head_dim: int, block_size: int) -> dict:
    return dict(NUM_KV_HEADS=num_kv_heads, KV_HEADS_PADDED=next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
                HEAD_DIM_PADDED=next_power_of_2(head_dim), BLOCK_SIZE=block_size)


def attention_constexprs(queries_per_kv: int, head_dim: int, block_size: int, sliding_window: Optional[int],
                         logit_softcap: Optional[float], dot_f32: bool, decode: bool) -> dict:
    """For `ragged_paged_attention_kernel`, or `paged_decode_kernel` when `decode`."""
    block_m = max(16, next_power_of_2(queries_per_kv)) if decode else RAGGED_BLOCK_M
    return dict(QUERIES_PER_KV=queries_per_kv, HEAD_DIM=head_dim, HEAD_DIM_PADDED=next_power_of_2(head_dim),
                BLOCK_SIZE=block_size, BLOCK_M=block_m, USE_SOFTCAP=logit_softcap is not None,
                USE_WINDOW=sliding_window is not None, DOT_F32=dot_f32)


def rms_norm_constexprs(size: int, has_residual: bool) -> dict:
    return dict(N=size, BLOCK_N=next_power_of_2(size), HAS_RESIDUAL=has_residual)


def rotary_constexprs(num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
    return dict(NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEADS_PADDED=next_power_of_2(num_heads),
                KV_HEADS_PADDED=next_power_of_2(num_kv_heads), HALF=head_dim // 2,
                HALF_PADDED=next_power_of_2(head_dim // 2))


def silu_and_mul_constexprs(size: int) -> dict:
    return dict(BLOCK=min(SILU_BLOCK, next_power_of_2(size)))


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels address the last dimension as contiguous; any other stride is taken by a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


# Decided once: the kernels above were made interpreted or compiled when their module was imported.
_INTERPRETED = interpreting()


def _dot_f32(dtype: torch.dtype) -> bool:
    return _INTERPRETED and dtype == torch.bfloat16


# --- attention ------------------------------------------------------------------------------------


@torch.library.custom_op("tokenmill_triton::write_kv_cache", mutates_args=("kv_cache",))
def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store each token's (num_kv_heads, head_dim) key and value at its slot; slots < 0 are skipped."""
    key, value = _unit_last_stride(key), _unit_last_stride(value)
    _, num_kv_heads, head_dim = key.shape
    write_kv_cache_kernel[(key.shape[0],)](
        key, value, kv_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        **write_kv_cache_constexprs(num_kv_heads, head_dim, kv_cache.shape[3]))


@write_kv_cache.register_fake
def _(key, value, kv_cache, slot_mapping) -> None:
    return None


@torch.library.custom_op("tokenmill_triton::ragged_paged_attention", mutates_args=())
def ragged_paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                           scale: float, sliding_window: Optional[int],
                           logit_softcap: Optional[float]) -> torch.Tensor:
    """Causal attention of a ragged batch over the cache, which already holds this step's keys."""
    query = _unit_last_stride(query)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    num_heads, head_dim = query.shape[1], query.shape[2]
    grid = (seq_lens.shape[0], num_heads, triton.cdiv(max_query_len, RAGGED_BLOCK_M))
    ragged_paged_attention_kernel[grid](
        out, query, kv_cache, block_tables, seq_lens, query_start_loc,
        scale, logit_softcap or 0.0, sliding_window or 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        **attention_constexprs(num_heads // kv_cache.shape[2], head_dim, kv_cache.shape[3], sliding_window,
                               logit_softcap, _dot_f32(query.dtype), decode=False))
    return out


@ragged_paged_attention.register_fake
def _(query, kv_cache, block_tables, seq_lens, query_start_loc, max_query_len, scale, sliding_window,
      logit_softcap):
    return query.new_empty(query.shape)


@torch.library.custom_op("tokenmill_triton::paged_decode_attention", mutates_args=())
def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, sliding_window: Optional[int],
                           logit_softcap: Optional[float]) -> torch.Tensor:
    """One query token per sequence (token i is sequence i's); a sequence of length 0 gives zeros.

    The grid is (num_seqs, num_kv_heads) whatever the context lengths, so a captured graph replays it.
    """
    query = _unit_last_stride(query)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[2]
    paged_decode_kernel[(seq_lens.shape[0], num_kv_heads)](
        out, query, kv_cache, block_tables, seq_lens,
        scale, logit_softcap or 0.0, sliding_window or 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        **attention_constexprs(num_heads // num_kv_heads, head_dim, kv_cache.shape[3], sliding_window,
                               logit_softcap, _dot_f32(query.dtype), decode=True))
    return out


@paged_decode_attention.register_fake
def _(query, kv_cache, block_tables, seq_lens, scale, sliding_window, logit_softcap):
    return query.new_empty(query.shape)


# --- layer ops ------------------------------------------------------------------------------------


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as (outer, inner, size) with unit last stride: a (tokens, heads, head_dim) view stays a view."""
    x = _unit_last_stride(x)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x if x.dim() == 3 else x.reshape(-1, 1, x.shape[-1])


def _launch_rms_norm(x, residual, weight, eps, offset):
    rows = _as_rows(x)
    res_rows = _as_rows(residual) if residual is not None else rows
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    rms_norm_kernel[(rows.shape[0] * rows.shape[1],)](
        rows, res_rows, weight, out, summed, rows.shape[1], rows.stride(0), rows.stride(1),
        res_rows.stride(0), res_rows.stride(1), eps, offset,
        **rms_norm_constexprs(x.shape[-1], residual is not None))
    return out, summed


@torch.library.custom_op("tokenmill_triton::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """`x / rms(x) * (weight + offset)` over the last dimension, in float32; x may be a strided view."""
    return _launch_rms_norm(x, None, weight, eps, offset)[0]


@rms_norm.register_fake
def _(x, weight, eps, offset):
    return x.new_empty(x.shape)


@torch.library.custom_op("tokenmill_triton::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(x + residual), x + residual)`, the sum rounded to x's dtype before normalising."""
    return _launch_rms_norm(x, residual, weight, eps, offset)


@fused_add_rms_norm.register_fake
def _(x, residual, weight, eps, offset):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("tokenmill_triton::rotary_embedding", mutates_args=("query", "key"))
def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> None:
    """Rotate-half RoPE in place on (tokens, heads, head_dim) query and key with unit last stride.

    They may be strided views into one fused qkv projection: only their own elements are written.
    """
    cos, sin = _unit_last_stride(cos), _unit_last_stride(sin)
    rotary_kernel[(query.shape[0],)](
        positions, query, key, cos, sin, query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        cos.stride(0), sin.stride(0), **rotary_constexprs(query.shape[1], key.shape[1], query.shape[2]))


@rotary_embedding.register_fake
def _(positions, query, key, cos, sin) -> None:
    return None


@torch.library.custom_op("tokenmill_triton::silu_and_mul", mutates_args=())
def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for gate, up the two halves of the last dimension."""
    size = gate_up.shape[-1] // 2
    rows = _unit_last_stride(gate_up).reshape(-1, 2 * size)
    out = torch.empty((*gate_up.shape[:-1], size), dtype=gate_up.dtype, device=gate_up.device)
    block = silu_and_mul_constexprs(size)["BLOCK"]
    silu_and_mul_kernel[(rows.shape[0], triton.cdiv(size, block))](rows, out, rows.stride(0), size, BLOCK=block)
    return out


@silu_and_mul.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))
