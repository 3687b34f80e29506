"""The backend's fused layer ops give the PyTorch reference's results, up to the dtype's rounding."""

from __future__ import annotations

import pytest
import torch

from tokenmill.conformance.plugin import dtypes_under_test
from tokenmill.interfaces import LayerOps

pytestmark = pytest.mark.kernel  # runs under `tokenmill conformance --interpret` too

REFERENCE = LayerOps()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])


@pytest.fixture
def ops(backend, platform, dtype) -> LayerOps:
    if dtype not in dtypes_under_test(platform):
        pytest.skip(f"{dtype} is not among the dtypes this backend runs")
    return backend.layer_ops(dtype)


def _tolerance(dtype: torch.dtype) -> dict:
    # One bf16 rounding step apart at most (a float32 sum in another order can tip a rounding).
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1.6e-2}


def _randn(*shape, dtype, device, seed) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=device)


@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(ops, device, dtype, tokens, with_residual) -> None:
    x = _randn(tokens, 96, dtype=dtype, device=device, seed=1)
    residual = _randn(tokens, 96, dtype=dtype, device=device, seed=2) if with_residual else None
    weight = _randn(96, dtype=dtype, device=device, seed=3)
    got = ops.rms_norm(x, residual, weight, 1e-5, 0.0)
    want = REFERENCE.rms_norm(x, residual, weight, 1e-5, 0.0)
    for g, w in zip(got if with_residual else [got], want if with_residual else [want]):
        torch.testing.assert_close(g.float().cpu(), w.float().cpu(), **_tolerance(dtype))


@pytest.mark.parametrize("fused_projection", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_over_heads(ops, device, dtype, fused_projection, offset) -> None:
    # Qwen3's per-head norm of queries and keys; the models pass views into the fused projection's output.
    x = _randn(5, 4, 32, dtype=dtype, device=device, seed=4)
    if fused_projection:
        qkv = _randn(5, 8 * 32, dtype=dtype, device=device, seed=11)
        x = qkv[:, 2 * 32 : 6 * 32].view(5, 4, 32)
    before = x.clone()
    weight = _randn(32, dtype=dtype, device=device, seed=5)
    torch.testing.assert_close(ops.rms_norm(x, None, weight, 1e-6, offset).float().cpu(),
                               REFERENCE.rms_norm(x, None, weight, 1e-6, offset).float().cpu(), **_tolerance(dtype))
    assert torch.equal(x, before)  # the projection's output is still read after (values, other heads)


@pytest.mark.parametrize("fused_projection", [True, False])
def test_rotary(ops, device, dtype, fused_projection) -> None:
    tokens, heads, kv_heads, head_dim = 6, 4, 2, 16
    table = _randn(64, head_dim, dtype=dtype, device=device, seed=6)
    cos, sin = table.cos(), table.sin()
    positions = torch.tensor([0, 5, 9, 63, 1, 2], device=device)
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device, seed=7)
    if fused_projection:  # views into one projection output, as the models pass them
        q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    else:
        q = _randn(tokens, heads, head_dim, dtype=dtype, device=device, seed=8)
        k = _randn(tokens, kv_heads, head_dim, dtype=dtype, device=device, seed=9)
    want_q, want_k = REFERENCE.rotary(positions, q.clone(), k.clone(), cos, sin)
    got_q, got_k = ops.rotary(positions, q, k, cos, sin)
    torch.testing.assert_close(got_q.float().cpu(), want_q.float().cpu(), **_tolerance(dtype))
    torch.testing.assert_close(got_k.float().cpu(), want_k.float().cpu(), **_tolerance(dtype))


@pytest.mark.parametrize("tokens", [1, 9, 200])
def test_silu_and_mul(ops, device, dtype, tokens) -> None:
    gate_up = _randn(tokens, 2 * 80, dtype=dtype, device=device, seed=10) * 4
    torch.testing.assert_close(ops.silu_and_mul(gate_up).float().cpu(), REFERENCE.silu_and_mul(gate_up).float().cpu(),
                               **_tolerance(dtype))
