"""Discovery, device set-up, memory budget: what every backend must answer sensibly."""

from __future__ import annotations

import pytest
import torch

from tokenmill.interfaces import BackendStatus, DevicePlatform, Discovery, GGMLWeight, MemoryRequest


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


@pytest.mark.paged_cache
def test_memory_budget_honours_an_explicit_size(backend, device) -> None:
    assert backend.memory_budget(device, MemoryRequest(weights_bytes=1 << 20, kv_cache_bytes=123 << 20)) == 123 << 20


@pytest.mark.paged_cache
def test_memory_budget_without_a_size_is_positive(backend, device) -> None:
    budget = backend.memory_budget(device, MemoryRequest(weights_bytes=1 << 20))
    assert budget > 0


def test_communicator_with_one_rank_is_the_identity(backend, device) -> None:
    comm = backend.communicator(world_size=1, rank=0, device=device)
    assert comm.dist_backend
    x = torch.arange(4.0, device=device)
    assert torch.equal(comm.all_reduce(x.clone()), x)
    assert torch.equal(comm.all_gather(x.clone(), dim=0), x)


@pytest.mark.kernel
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_quantization_methods_approximate_the_dense_matmul(backend, platform: DevicePlatform, rows) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(64, 256, generator=generator)
    x = torch.randn(rows, 256, generator=generator)
    dtype = platform.preferred_dtype
    for name, method in backend.quantization_methods.items():
        prepared = method.prepare(weight.to(platform.device, dtype))
        got = method.matmul(x.to(platform.device, dtype), prepared).double().cpu()
        assert got.shape == (rows, 64), name
        dequantized = method.dequantize(prepared)
        if dequantized is None:  # a method that cannot show its weight: only the quantization's quality
            expected = x.double() @ weight.double().T
            error = (got - expected).norm() / expected.norm()
            assert error < 0.05, f"quantization {name!r}: relative error {error:.3f}"
            continue
        # The kernel, apart from the quantization: as exact as F.linear on the weight it stands for.
        exact = dequantized.double().cpu()
        expected = x.to(dtype).double() @ exact.T
        dense = torch.nn.functional.linear(x.to(platform.device, dtype), dequantized.to(dtype)).double().cpu()
        slack = 1.5 * (dense - expected).norm() + 1e-6 * expected.norm()
        assert (got - expected).norm() <= slack, f"quantization {name!r}: kernel error beyond F.linear's"
        # And the weight it stands for is a quantization of the original, not another matrix.
        relative = (exact - weight.to(dtype).double()).norm() / weight.double().norm()
        assert relative < 0.2, f"quantization {name!r}: weight error {relative:.3f}"


@pytest.mark.kernel
@pytest.mark.parametrize("rows", [0, 1, 5, 8, 13, 64])
@pytest.mark.parametrize("out_features,in_features", [(64, 128), (50, 96), (960, 576), (24, 33)])
def test_the_dense_linear_method_matches_f_linear(backend, platform: DevicePlatform, rows, out_features,
                                                   in_features) -> None:
    # The backend's unquantized linears (packed weights, own kernels) stand in for F.linear at every
    # batch size and shape, including ragged ones: same result up to the dtype's rounding.
    for dtype in platform.supported_dtypes:
        method = backend.dense_linear_method(dtype)
        if method is None:
            continue
        generator = torch.Generator().manual_seed(rows)
        weight = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(dtype)
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        expected = torch.nn.functional.linear(x.float(), weight.float())
        got = method.matmul(x.to(platform.device), method.prepare(weight.to(platform.device))).float().cpu()
        assert got.shape == expected.shape and got.dtype == torch.float32
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.kernel
@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 5, 13, 40])
@pytest.mark.parametrize("out_features,in_features", [(64, 128), (50, 96), (960, 576)])
def test_linear_methods_run_ggml_blocks_at_least_as_exactly_as_their_dense_weight(
        backend, platform: DevicePlatform, ggml_type, rows, out_features, in_features) -> None:
    # A method that takes a GGUF weight's own blocks is a speed path: against the product with the
    # blocks' exact values, no worse than the same method on the weight dequantized to the dtype.
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    generator = torch.Generator().manual_seed(rows)
    kind = GGMLQuantizationType[ggml_type]
    blocks = quantize((torch.randn(out_features, in_features, generator=generator) * 0.05).numpy(), kind)
    exact = torch.from_numpy(dequantize(blocks, kind)).double()
    ggml = GGMLWeight(ggml_type, torch.from_numpy(blocks), in_features)
    methods = [backend.dense_linear_method(dtype) for dtype in platform.supported_dtypes]
    for dtype, method in zip(platform.supported_dtypes, methods):
        weight = exact.to(dtype).to(platform.device)
        prepared = method.prepare_ggml(weight, ggml) if method is not None else None
        if prepared is None:
            continue
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        expected = x.double() @ exact.T
        got = method.matmul(x.to(platform.device), prepared).double().cpu()
        dense = method.matmul(x.to(platform.device), method.prepare(weight)).double().cpu()
        assert got.shape == expected.shape
        assert (got - expected).norm() <= 1.1 * (dense - expected).norm() + 1e-6, (dtype, ggml_type, rows)
