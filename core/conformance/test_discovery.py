"""Discovery, device set-up, memory budget: what every backend must answer sensibly."""

from __future__ import annotations

import torch

from tokenmill.interfaces import BackendStatus, DevicePlatform, Discovery, MemoryRequest


def test_discovery_reports_a_usable_device(discovery: Discovery) -> None:
    assert discovery.status is BackendStatus.USABLE
    assert discovery.reason
    assert isinstance(discovery.priority, int)
    assert discovery.devices, "a usable backend lists at least one device"
    for device in discovery.devices:
        assert device.total_memory_bytes > 0, f"device {device.index} reports no memory"


def test_discovery_is_repeatable(backend, discovery: Discovery) -> None:
    again = backend.registry.plugin(backend.name).tokenmill_discover()
    assert again.status == discovery.status
    assert [d.index for d in again.devices] == [d.index for d in discovery.devices]


def test_init_device_describes_the_device(platform: DevicePlatform) -> None:
    assert isinstance(platform.device, torch.device)
    assert platform.preferred_dtype in platform.supported_dtypes
    assert torch.ones(2, device=platform.device).sum().item() == 2


def test_memory_budget_honours_an_explicit_size(backend, device) -> None:
    assert backend.memory_budget(device, MemoryRequest(weights_bytes=1 << 20, kv_cache_bytes=123 << 20)) == 123 << 20


def test_memory_budget_without_a_size_is_positive(backend, device) -> None:
    budget = backend.memory_budget(device, MemoryRequest(weights_bytes=1 << 20))
    assert budget > 0


def test_communicator_with_one_rank_is_the_identity(backend, device) -> None:
    comm = backend.communicator(world_size=1, rank=0, device=device)
    assert comm.dist_backend
    x = torch.arange(4.0, device=device)
    assert torch.equal(comm.all_reduce(x.clone()), x)
    assert torch.equal(comm.all_gather(x.clone(), dim=0), x)


def test_quantization_methods_approximate_the_dense_matmul(backend, platform: DevicePlatform) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator)
    x = torch.randn(5, 128, generator=generator)
    dtype = platform.preferred_dtype
    expected = (x @ weight.T).to(platform.device)
    for name, method in backend.quantization_methods.items():
        prepared = method.prepare(weight.to(platform.device, dtype))
        got = method.matmul(x.to(platform.device, dtype), prepared).float()
        error = (got - expected).norm() / expected.norm()
        assert error < 0.05, f"quantization {name!r}: relative error {error:.3f}"
