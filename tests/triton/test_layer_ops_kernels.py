"""The fused layer-op kernels give `LayerOps()`'s results, up to the dtype's rounding, on the layouts
the models pass: strided (tokens, heads, head_dim) views of one fused qkv projection included."""

from __future__ import annotations

import pytest
import torch

from tokenmill.interfaces import LayerOps
from tokenmill.plugins.triton.layer_ops import TritonLayerOps

REFERENCE = LayerOps()
OPS = TritonLayerOps()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tolerance(dtype: torch.dtype) -> dict:
    # The kernels round once where the reference rounds after each op, and the interpreter truncates
    # float32 to bfloat16 where a GPU rounds to nearest: two bf16 steps apart at most.
    return {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}[dtype]


def _randn(*shape, dtype, device, seed) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=device)


def _close(got, want, dtype) -> None:
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), **_tolerance(dtype))


def _qkv_views(tokens, heads, kv_heads, head_dim, dtype, device):
    """Query and key as the models pass them: views into one projection output, strided by its width."""
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device, seed=7)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return qkv, q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(device, dtype, tokens, with_residual) -> None:
    x = _randn(tokens, 96, dtype=dtype, device=device, seed=1)  # 96: padded to 128 inside the kernel
    residual = _randn(tokens, 96, dtype=dtype, device=device, seed=2) if with_residual else None
    weight = _randn(96, dtype=dtype, device=device, seed=3)
    for offset in (0.0, 1.0):
        got = OPS.rms_norm(x, residual, weight, 1e-5, offset)
        want = REFERENCE.rms_norm(x, residual, weight, 1e-5, offset)
        if with_residual:
            _close(got[0], want[0], dtype)
            if dtype == torch.bfloat16 and device.type == "cpu":
                _close(got[1], want[1], dtype)  # the interpreter truncates to bf16 where GPUs round
            else:
                assert torch.equal(got[1], want[1])  # the next residual: the very numbers of x + residual
        else:
            _close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_per_head_on_a_strided_view(device, dtype) -> None:
    """Qwen3's q/k norm: (tokens, heads, head_dim) over head_dim, the query a view of the projection."""
    _, q, _, _ = _qkv_views(5, 4, 2, 32, dtype, device)
    weight = _randn(32, dtype=dtype, device=device, seed=5)
    assert not q.is_contiguous()
    _close(OPS.rms_norm(q, None, weight, 1e-6, 1.0), REFERENCE.rms_norm(q, None, weight, 1e-6, 1.0), dtype)
    x = _randn(2, 3, 5, 32, dtype=dtype, device=device, seed=6)  # any number of leading dimensions
    _close(OPS.rms_norm(x, None, weight, 1e-6, 0.0), REFERENCE.rms_norm(x, None, weight, 1e-6, 0.0), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fused_projection", [True, False], ids=["qkv_views", "separate"])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_rotary(device, dtype, fused_projection, head_dim) -> None:
    tokens, heads, kv_heads = 6, 3, 2  # 3 heads: padded to 4 inside the kernel
    table = _randn(64, head_dim, dtype=dtype, device=device, seed=6)  # halves differ: not assumed equal
    cos, sin = table.cos(), table.sin()
    positions = torch.tensor([0, 5, 9, 63, 1, 2], device=device)
    if fused_projection:
        qkv, q, k, v = _qkv_views(tokens, heads, kv_heads, head_dim, dtype, device)
        v_before = v.clone()
    else:
        q = _randn(tokens, heads, head_dim, dtype=dtype, device=device, seed=8)
        k = _randn(tokens, kv_heads, head_dim, dtype=dtype, device=device, seed=9)
    want_q, want_k = REFERENCE.rotary(positions, q.clone(), k.clone(), cos, sin)
    got_q, got_k = OPS.rotary(positions, q, k, cos, sin)
    _close(got_q, want_q, dtype)
    _close(got_k, want_k, dtype)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # rotated in place
    if fused_projection:
        assert torch.equal(v, v_before)  # the values beside them in the projection are untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 160), (9, 160), (2, 3, 160), (2, 2200)], ids=str)
def test_silu_and_mul(device, dtype, shape) -> None:
    gate_up = _randn(*shape, dtype=dtype, device=device, seed=10) * 4  # 2200: two column blocks a row
    got = OPS.silu_and_mul(gate_up)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    _close(got, REFERENCE.silu_and_mul(gate_up), dtype)


def test_layer_ops_on_meta_give_shapes_only() -> None:
    meta = torch.device("meta")
    x = torch.empty(5, 96, dtype=torch.bfloat16, device=meta)
    weight = torch.empty(96, dtype=torch.bfloat16, device=meta)
    assert OPS.rms_norm(x, None, weight, 1e-5).shape == (5, 96)
    normed, summed = OPS.rms_norm(x, x, weight, 1e-5)
    assert normed.shape == summed.shape == (5, 96) and normed.device == meta
    qkv = torch.empty(5, 8 * 16, dtype=torch.bfloat16, device=meta)
    q, k, _ = qkv.split([64, 32, 32], dim=-1)
    table = torch.empty(32, 16, dtype=torch.bfloat16, device=meta)
    got_q, got_k = OPS.rotary(torch.empty(5, dtype=torch.int64, device=meta), q.view(5, 4, 16), k.view(5, 2, 16),
                              table, table)
    assert got_q.shape == (5, 4, 16) and got_k.shape == (5, 2, 16)
    assert OPS.silu_and_mul(torch.empty(5, 3, 160, device=meta)).shape == (5, 3, 80)


def test_layer_ops_through_torch_compile(device) -> None:
    """Norm, in-place RoPE on projection views and SiLU-and-mul in one compiled graph."""

    def block(ops, x, residual, weight, w_qkv, positions, cos, sin):
        h, residual = ops.rms_norm(x, residual, weight, 1e-5)
        q, k, v = (h @ w_qkv).split([64, 32, 32], dim=-1)
        q, k = ops.rotary(positions, q.view(-1, 4, 16), k.view(-1, 2, 16), cos, sin)
        return ops.silu_and_mul(torch.cat([q.flatten(1), k.flatten(1), v], dim=-1)), residual

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g), torch.randn(32, generator=g),
            torch.randn(32, 128, generator=g), torch.tensor([0, 3, 7, 2, 9]),
            torch.randn(16, 16, generator=g).cos(), torch.randn(16, 16, generator=g).sin()]
    args = [a.to(device) for a in args]
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    got, want = compiled(OPS, *args), block(REFERENCE, *args)
    for g_, w_ in zip(got, want):
        _close(g_, w_, torch.float32)
