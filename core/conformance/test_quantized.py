"""Pre-quantized checkpoint weights (`QuantizedWeight`): each method that takes a checkpoint format runs
its weights at least as exactly as `F.linear` on the dequantized weight in the activations' dtype."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tokenmill.interfaces import FP8_CODE_TYPES, DevicePlatform, QuantizedWeight

OUT_FEATURES, IN_FEATURES = 40, 256  # 40: not a whole number of 16- or 32-output panels
INTEGER_FORMATS = ("gptq", "awq", "compressed-tensors", "gguf")


@dataclass(frozen=True)
class Case:
    """A kind of QuantizedWeight, and the checkpoint formats that produce it."""

    name: str
    code_type: str
    group_size: int
    offsets: bool = False
    act_order: bool = False
    lookup: bool = False
    formats: tuple[str, ...] = INTEGER_FORMATS


CASES = [
    Case("uint4 group 32 offsets", "uint4", 32, offsets=True),
    Case("uint4 group 128", "uint4", 128),
    Case("uint4 group 128 offsets act-order", "uint4", 128, offsets=True, act_order=True, formats=("gptq",)),
    Case("uint4 per-channel offsets", "uint4", IN_FEATURES, offsets=True),
    Case("uint8 group 32", "uint8", 32),
    Case("uint8 per-channel offsets", "uint8", IN_FEATURES, offsets=True),
    Case("uint4 lookup group 32", "uint4", 32, lookup=True, formats=("gguf",)),
    Case("fp8_e4m3 per-channel", "fp8_e4m3", IN_FEATURES, formats=("fp8", "compressed-tensors")),
    Case("fp8_e5m2 per-channel", "fp8_e5m2", IN_FEATURES, formats=("fp8", "compressed-tensors")),
]


def random_weight(case: Case, weight_format: str, generator: torch.Generator) -> QuantizedWeight:
    groups = IN_FEATURES // case.group_size
    shape = (OUT_FEATURES, IN_FEATURES)
    if case.code_type in FP8_CODE_TYPES:
        codes = torch.randn(shape, generator=generator).to(FP8_CODE_TYPES[case.code_type]).view(torch.uint8)
    else:
        codes = torch.randint(0, 2 ** int(case.code_type.removeprefix("uint")), shape, generator=generator,
                              dtype=torch.uint8)
    scales = torch.rand(OUT_FEATURES, groups, generator=generator) * 0.02 + 0.001
    offsets = -scales * torch.rand(OUT_FEATURES, groups, generator=generator) * 16 if case.offsets else None
    order = torch.randperm(IN_FEATURES, generator=generator) if case.act_order else None
    lookup = torch.sort(torch.randint(-127, 128, (16,), generator=generator).float()).values if case.lookup else None
    return QuantizedWeight(weight_format, case.code_type, codes, scales, offsets, case.group_size, order, lookup)


def _methods(backend, platform: DevicePlatform):
    """(dtype, method) for every method that takes a checkpoint format: the dense one of each dtype, and
    each quantization method in each dtype."""
    pairs = [(dtype, backend.dense_linear_method(dtype)) for dtype in platform.supported_dtypes]
    pairs += [(dtype, method) for method in backend.quantization_methods.values() for dtype in platform.supported_dtypes]
    return [(dtype, method) for dtype, method in pairs if method is not None and method.checkpoint_formats]


@pytest.mark.kernel
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_methods_run_quantized_weights_at_least_as_exactly_as_f_linear_on_their_dequantized_weight(
        backend, platform: DevicePlatform, case: Case, rows: int) -> None:
    methods = [(dtype, method, fmt) for dtype, method in _methods(backend, platform)
               for fmt in [next((f for f in case.formats if f in method.checkpoint_formats), None)] if fmt]
    if not methods:
        pytest.skip(f"no method of backend {backend.name!r} takes a checkpoint format producing {case.name}")
    generator = torch.Generator().manual_seed(rows)
    for dtype, method, weight_format in methods:
        weight = random_weight(case, weight_format, generator)
        exact = weight.dequantize(torch.float64)
        x = torch.randn(rows, IN_FEATURES, generator=generator).to(dtype)
        expected = x.double() @ exact.T
        prepared = method.prepare_quantized(weight)
        got = method.matmul(x.to(platform.device), prepared).double().cpu()
        assert got.shape == expected.shape, (method.name, dtype)
        dense = torch.nn.functional.linear(x, exact.to(dtype)).double()
        slack = 1.25 * (dense - expected).norm() + 1e-6 * expected.norm()
        error = (got - expected).norm()
        assert error <= slack, f"{method.name} in {dtype}, {weight_format}: error {error:.3g} beyond F.linear's {slack:.3g}"
