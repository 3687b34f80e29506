"""The backend's LoRA method gives the reference segmented matmul's result, up to the dtype's rounding.

Adapters are stacked by slot as the engine stacks them (slot 0 zeros, lower ranks zero-padded, the scale
in B); steps mix the base model's tokens with several adapters' in any order, as a batch does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmill.conformance.plugin import dtypes_under_test
from tokenmill.interfaces import LoRABatch, LoRAMethod
from tokenmill.lora.batch import group_by_slot
from tokenmill.model_runner import host_to_device

pytestmark = pytest.mark.kernel  # runs under `tokenmill conformance --interpret` too

REFERENCE = LoRAMethod()
IN_FEATURES, OUT_FEATURES = 96, 160


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])


@pytest.fixture
def method(backend, platform, dtype) -> LoRAMethod:
    if dtype not in dtypes_under_test(platform):
        pytest.skip(f"{dtype} is not among the dtypes this backend runs")
    return backend.lora_method(dtype)


def _stacks(num_adapters: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(num_adapters + 1, rank, IN_FEATURES, generator=generator) * 0.2
    b = torch.randn(num_adapters + 1, OUT_FEATURES, rank, generator=generator) * 0.2
    a[0], b[0] = 0, 0  # the base model
    a[1, rank // 2:], b[1, :, rank // 2:] = 0, 0  # an adapter of half the rank, padded
    return a, b


def _batch(slots: list[int], device: torch.device) -> LoRABatch:
    packed, segments = group_by_slot(np.array(slots, dtype=np.int64), len(slots))
    sent = host_to_device(packed, device)
    return LoRABatch(sent[: len(slots)], sent[len(slots):], segments)


# name -> (token slots, adapters loaded, rank): decodes over several adapters, one adapter alone, prefills
# of one and of two adapters among base tokens, and many adapters at a high rank.
STEPS = {
    "decode_mixed": ([3, 0, 1, 2, 2, 0, 3, 1, 1, 0, 2, 3, 0, 1, 2, 3], 3, 8),
    "one_token": ([2], 2, 8),
    "prefill_mixed": ([0] * 20 + [1, 2, 0] * 60, 2, 8),
    "prefill_one_adapter": ([0] * 64 + [1] * 200, 1, 8),
    "prefill_two_adapters": ([1] * 150 + [0] * 40 + [2] * 110, 2, 16),
    "many_adapters": ([(i * 7) % 13 for i in range(40)], 12, 32),
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_lora_method_matches_the_segmented_reference(method, device, dtype, step) -> None:
    slots, num_adapters, rank = STEPS[step]
    a, b = _stacks(num_adapters, rank, seed=len(step))
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(len(slots), IN_FEATURES, generator=generator).to(dtype=dtype, device=device)
    y = torch.randn(len(slots), OUT_FEATURES, generator=generator).to(dtype=dtype, device=device)
    a, b = a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device)

    batch = _batch(slots, device)
    REFERENCE.prepare_step(batch)
    want = REFERENCE.apply(y.clone(), x, REFERENCE.prepare(a, b), batch).float().cpu()
    batch = _batch(slots, device)
    method.prepare_step(batch)
    got = method.apply(y.clone(), x, method.prepare(a, b), batch).float().cpu()

    base_rows = [i for i, slot in enumerate(slots) if slot == 0]
    torch.testing.assert_close(got[base_rows], y.float().cpu()[base_rows], rtol=0, atol=0)  # untouched
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 6e-2, "rtol": 2e-2}
    torch.testing.assert_close(got, want, **tolerance)


def test_lora_method_runs_many_steps_over_one_prepared_layer(method, device, dtype) -> None:
    # A method may keep state between steps (a cache of the last step's stacked adapters): the adapters a
    # step uses change from step to step and each result must still be its own.
    a, b = _stacks(4, 8, seed=3)
    a, b = a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device)
    prepared, reference = method.prepare(a, b), REFERENCE.prepare(a, b)
    generator = torch.Generator().manual_seed(5)
    for slots in ([1, 2, 0], [4, 4, 1, 0, 2], [1, 2, 0], [3], [0, 2, 4, 4]):
        x = torch.randn(len(slots), IN_FEATURES, generator=generator).to(dtype=dtype, device=device)
        y = torch.zeros(len(slots), OUT_FEATURES, dtype=dtype, device=device)
        batch = _batch(slots, device)
        method.prepare_step(batch)
        got = method.apply(y.clone(), x, prepared, batch).float().cpu()
        want = REFERENCE.apply(y.clone(), x, reference, _batch(slots, device)).float().cpu()
        tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 6e-2, "rtol": 2e-2}
        torch.testing.assert_close(got, want, **tolerance)
