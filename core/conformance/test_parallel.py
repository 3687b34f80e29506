"""Tensor parallelism on this backend: its communicator over 2 ranks, and a model sharded over them.

The ranks are real processes, each bound to its device by the backend (`parallel_harness.py`); where
discovery finds one device, both ranks share it, and a backend whose collective library refuses that
is skipped with the library's reason. Not `kernel` cases: they need the devices, not an interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from tokenmill.conformance.parallel_harness import (
    COLLECTIVES,
    FAMILIES,
    WORLD_SIZE,
    Job,
    RanksFailed,
    engine_config,
    expected_collective,
    greedy_tokens,
    run_ranks,
    tiny_model,
    weight_count,
)
from tokenmill.conformance.ports import free_port
from tokenmill.conformance.plugin import dtypes_under_test, has_paged_cache
from tokenmill.engine import Engine


@dataclass
class Ranks:
    """The run's results per rank, or why it failed (each failing rank's traceback)."""

    results: dict[int, dict[str, Any]] | None
    failure: str | None = None
    reported: bool = False

    def get(self) -> dict[int, dict[str, Any]]:
        if self.failure is not None:
            if self.reported:  # every case fails with the run; the tracebacks once are enough
                pytest.fail("the ranks failed: see the first failed case of test_parallel.py", pytrace=False)
            self.reported = True
            pytest.fail(self.failure, pytrace=False)
        return self.results


@pytest.fixture(scope="module")
def ranks(request, backend, discovery, platform) -> Ranks:
    if request.config.getoption("--tokenmill-interpret"):
        pytest.skip("tensor parallelism needs the backend's devices and processes, not its interpreter")
    found = len(discovery.devices)
    shared = found < WORLD_SIZE
    floats = tuple(dtypes_under_test(platform))
    # The ranks shard the core's models; a backend running its own model has none to shard.
    families = FAMILIES if torch.float32 in platform.supported_dtypes and has_paged_cache(backend) else ()
    job = Job(backend.name, free_port(), shared, floats + (torch.int64,), families)
    try:
        return Ranks(run_ranks(job))
    except RanksFailed as exc:
        if shared and exc.stage == "setup":
            pytest.skip(f"backend {backend.name!r} found {found} device(s) and cannot run {WORLD_SIZE} ranks on "
                        f"one: {exc.reason}")
        return Ranks(None, str(exc))


def _dtype(label: str, platform) -> torch.dtype:
    if label == "int64":
        return torch.int64
    if label == "float32":
        if torch.float32 not in platform.supported_dtypes:
            pytest.skip("the platform does not support float32")
        return torch.float32
    if platform.preferred_dtype == torch.float32:
        pytest.skip("the preferred dtype is float32, checked in its own case")
    return platform.preferred_dtype


@pytest.mark.parametrize("dtype_label", ["float32", "preferred", "int64"])
@pytest.mark.parametrize("collective", list(COLLECTIVES))
def test_collectives_match_the_host_reference(ranks, platform, collective, dtype_label) -> None:
    dtype = _dtype(dtype_label, platform)
    expected = expected_collective(collective, dtype)
    for rank, results in ranks.get().items():
        got, on_its_device = results["collectives"][collective, dtype]
        assert on_its_device, f"rank {rank}: the {collective} result left the rank's device"
        assert got.dtype == dtype and got.shape == expected.shape, f"rank {rank}: {got.dtype} {tuple(got.shape)}"
        assert torch.equal(got, expected), f"rank {rank}: {collective} of {dtype} differs from the host's"


@pytest.mark.paged_cache
@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_generate_the_tokens_of_one(ranks, backend, platform, family) -> None:
    if torch.float32 not in platform.supported_dtypes:
        pytest.skip("token identity with one rank is checked in float32, which the platform does not support")
    sharded = ranks.get()
    engine = Engine(engine_config(backend.name), backend=backend, checkpoint=tiny_model(family).checkpoint())
    one_rank = greedy_tokens(engine)
    for rank, results in sharded.items():
        assert results["tokens"][family] == one_rank, f"{family}: rank {rank}'s tokens over {WORLD_SIZE} ranks"
        # The same tokens from a rank that held the whole model would prove nothing about sharding.
        assert results["weights"][family] < weight_count(engine), f"{family}: rank {rank} holds the whole model"
