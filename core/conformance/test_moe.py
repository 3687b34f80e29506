"""The backend's mixture-of-experts method gives the reference's result, up to the dtype's rounding.

The routing is written into the router logits: every token ranks the experts in a random order, with
levels far enough apart that no two are tied in any dtype, so both methods must pick the same experts and
only the weights' and matmuls' rounding may differ. Steps range from one token to a few hundred, top-k 1
and 2, with and without renormalization, and some send their tokens to a few experts only, so that experts
receive no token, one, or all of them, in uneven counts.
"""

from __future__ import annotations

import pytest
import torch

from tokenmill.conformance.plugin import dtypes_under_test
from tokenmill.interfaces import MoEMethod

pytestmark = pytest.mark.kernel  # runs under `tokenmill conformance --interpret` too

REFERENCE = MoEMethod()
HIDDEN, INTERMEDIATE, EXPERTS = 96, 64, 8
LEVEL = 0.75  # between two experts' logits: well above bf16's rounding at these magnitudes

# name -> (tokens, top_k, renormalize, experts the tokens may go to; None: all)
STEPS = {
    "decode_top1": (1, 1, False, None),
    "decode_batch_top2": (7, 2, True, None),
    "prefill_top2": (300, 2, True, None),
    "prefill_top1_unnormalized": (133, 1, False, None),
    "ragged_idle_experts": (37, 2, False, [1, 4, 6]),
    "one_expert_takes_all": (50, 1, True, [3]),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])


@pytest.fixture
def method(backend, platform, dtype) -> MoEMethod:
    if dtype not in dtypes_under_test(platform):
        pytest.skip(f"{dtype} is not among the dtypes this backend runs")
    return backend.moe_method(dtype)


def _experts(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    gate_up = torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=generator) * 0.1
    down = torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, generator=generator) * 0.1
    return gate_up.to(dtype=dtype, device=device), down.to(dtype=dtype, device=device)


def _router_logits(num_tokens: int, allowed: list[int] | None, seed: int) -> torch.Tensor:
    """Per token a random ranking of the experts as distinct levels, `allowed` lifted above all others."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.rand(num_tokens, EXPERTS, generator=generator).argsort(dim=1).float() * LEVEL
    if allowed is not None:
        levels[:, allowed] += EXPERTS * LEVEL
    return levels + torch.rand(num_tokens, EXPERTS, generator=generator) * 0.1


def _tolerance(dtype: torch.dtype) -> dict:
    return {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_moe_method_matches_the_reference(method, device, dtype, step) -> None:
    num_tokens, top_k, renormalize, allowed = STEPS[step]
    gate_up, down = _experts(dtype, device)
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(len(step))).to(dtype=dtype,
                                                                                                device=device)
    logits = _router_logits(num_tokens, allowed, seed=num_tokens).to(dtype=dtype, device=device)
    # The reference runs on the host: it slices by counts read there, which static-shape devices refuse.
    want = REFERENCE.apply(x.cpu(), logits.cpu(), REFERENCE.prepare(gate_up.cpu(), down.cpu()), top_k, renormalize)
    got = method.apply(x, logits, method.prepare(gate_up.clone(), down.clone()), top_k, renormalize)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), **_tolerance(dtype))


def test_moe_method_runs_many_steps_over_one_prepared_layer(method, device, dtype) -> None:
    # A method may keep state between steps (scratch buffers, the last step's sorting); each result is its own.
    gate_up, down = _experts(dtype, device)
    prepared, reference = method.prepare(gate_up.clone(), down.clone()), REFERENCE.prepare(gate_up.cpu(), down.cpu())
    generator = torch.Generator().manual_seed(5)
    for num_tokens, allowed in ((3, None), (40, [0, 7]), (1, [5, 2]), (64, None), (2, None)):
        x = torch.randn(num_tokens, HIDDEN, generator=generator).to(dtype=dtype, device=device)
        logits = _router_logits(num_tokens, allowed, seed=num_tokens).to(dtype=dtype, device=device)
        got = method.apply(x, logits, prepared, 2, True).float().cpu()
        want = REFERENCE.apply(x.cpu(), logits.cpu(), reference, 2, True).float()
        torch.testing.assert_close(got, want, **_tolerance(dtype))


def test_reference_routing_picks_the_top_experts_and_renormalizes(device) -> None:
    # The reference itself, against the routing written into the logits: the contract every backend meets.
    logits = _router_logits(20, [2, 5, 6], seed=3).to(device)
    weights, ids = REFERENCE.route(logits, 2, renormalize=True)
    assert set(ids.flatten().tolist()) <= {2, 5, 6}
    assert torch.equal(ids.cpu(), logits.cpu().topk(2, dim=-1).indices)
    torch.testing.assert_close(weights.sum(-1).cpu(), torch.ones(20))
    unnormalized, _ = REFERENCE.route(logits, 2, renormalize=False)
    assert bool((unnormalized.sum(-1) < 1).all())
