"""The Triton quantized linears: as exact as the dense product with their own dequantized weight.

The contract of every quantization method of the project: against the float64 product with the
weight the method actually holds (its dequantized form), `matmul` is at least as exact as `F.linear`
run with that weight in the activations' dtype. The slack (1.5x, plus an absolute term of 1e-9 of the
product's norm for a reference that comes out exact) covers float32, where both errors are a few
ulps of summation in different orders and their ratio wanders around 1; in float32 the absolute term is
4 ulps of the product's norm, as F.linear's own error depends on the host's BLAS (on one Xeon it came out
at 1.6 ulps where the interpreted kernels' was 2.7, a ratio of 1.6). Every bug this guards against
(a wrong nibble, scale, mask or tile, a weight rounded to bf16, tf32) costs orders of magnitude more.
In bf16 and fp16 the kernels round once, at the end, and come out below F.linear, which also rounds
the weight. Shapes are tiny because the kernels run in Triton's interpreter here (~5 ms a tile step).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.plugins.triton import quant_kernels
from tokenmill.plugins.triton.quant import (
    INT4_GROUP_SIZES,
    FP8Weight,
    Int4WeightOnly,
    Int8WeightOnly,
    fp8_weight,
    quantization_methods,
    quantize_activations_fp8,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (method, out_features, in_features): N never a multiple of a tile (16, 32, 64), K not of 64 where
# the method allows it (int4 needs whole groups, so its K is a multiple of BLOCK_K by construction).
CASES = {
    "int8": (Int8WeightOnly, 72, 200),
    "int4-g32": (lambda: Int4WeightOnly(group_size=32), 72, 160),
    "int4-g128": (Int4WeightOnly, 40, 384),
    "fp8": (lambda: FP8Weight(native_fp8=False), 72, 200),
}
SLACK, ABS_SLACK = 1.5, 1e-9
FLOAT32_ABS_SLACK = 4 * 2.0**-24  # 4 ulps (unit roundoff 2^-24) of the product's norm


def random_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator) / in_features**0.5


def errors_against_exact(got: torch.Tensor, x: torch.Tensor, dequantized: torch.Tensor) -> tuple[float, float, float]:
    """(|got - exact|, |F.linear in got's dtype - exact|, |exact|): Frobenius norms, exact in float64."""
    exact = x.double() @ dequantized.double().T
    reference = F.linear(x.to(got.dtype), dequantized.to(got.dtype)).double()
    return (got.double() - exact).norm().item(), (reference - exact).norm().item(), exact.norm().item()


def assert_at_least_as_exact_as_f_linear(got, x, dequantized, label: str) -> None:
    error, reference_error, norm = errors_against_exact(got, x, dequantized)
    absolute = FLOAT32_ABS_SLACK if got.dtype == torch.float32 else ABS_SLACK
    assert error <= SLACK * reference_error + absolute * norm, (
        f"{label}: relative error {error / norm:.3e}, F.linear's {reference_error / norm:.3e}")


@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matmul_is_at_least_as_exact_as_f_linear_with_the_dequantized_weight(case, dtype, rows) -> None:
    make, out_features, in_features = CASES[case]
    method = make()
    prepared = method.prepare(random_weight(out_features, in_features).to(dtype))
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
    got = method.matmul(x, prepared)
    assert got.shape == (rows, out_features) and got.dtype == dtype
    assert_at_least_as_exact_as_f_linear(got, x, method.dequantize(prepared), f"{case} {dtype} rows={rows}")


def test_a_strided_and_batched_input_gives_the_rows_of_the_contiguous_one() -> None:
    method = Int8WeightOnly()
    prepared = method.prepare(random_weight(40, 96))
    x = torch.randn(3, 96, 2)[:, :, 0]  # stride (192, 2)
    expected = method.matmul(x.contiguous(), prepared)
    torch.testing.assert_close(method.matmul(x, prepared), expected, rtol=0, atol=0)
    torch.testing.assert_close(method.matmul(x.contiguous().view(1, 3, 96), prepared), expected.view(1, 3, 40),
                               rtol=0, atol=0)
    assert method.matmul(x[:0], prepared).shape == (0, 40)


def test_prepare_error_against_the_original_weight_is_small_and_ordered() -> None:
    weight = random_weight(72, 256)
    weight[3, :40] = 0.0  # a zero stretch must stay exactly zero (the int4 grid holds 0)
    relative = {}
    for name, method in [("int8", Int8WeightOnly()), ("int4-g32", Int4WeightOnly(32)),
                         ("int4-g128", Int4WeightOnly(128)), ("fp8", FP8Weight(native_fp8=False))]:
        dequantized = method.dequantize(method.prepare(weight))
        assert dequantized.shape == weight.shape
        assert torch.equal(dequantized[3, :40], torch.zeros(40)), name
        relative[name] = ((dequantized - weight).norm() / weight.norm()).item()
    # Gaussian rows: int8 rounds to 1/127 of the row's max, fp8 to 3 mantissa bits, int4 to 1/15 of a
    # group's range; smaller groups fit tighter.
    assert relative["int8"] < 0.01 and relative["fp8"] < 0.04, relative
    assert relative["int4-g32"] < relative["int4-g128"] < 0.12, relative
    assert relative["int8"] < relative["fp8"] < relative["int4-g32"], relative
    assert 5 * relative["int8"] < relative["int4-g32"], relative


def test_prepared_forms_are_compact_and_stay_on_the_weight_device() -> None:
    weight = random_weight(48, 256).to(torch.bfloat16)
    int8 = Int8WeightOnly().prepare(weight)
    int4 = Int4WeightOnly(64).prepare(weight)
    fp8 = FP8Weight(native_fp8=False).prepare(weight)
    assert int8.weight.dtype == torch.int8 and int8.weight.shape == (48, 256)
    assert int4.packed.dtype == torch.uint8 and int4.packed.shape == (48, 128)
    assert int4.scales.shape == int4.zeros.shape == (4, 48) and int4.zeros.max() <= 15
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.scales.shape == (48,)
    for tensor in (int8.weight, int8.scales, int4.packed, int4.scales, fp8.weight):
        assert tensor.device == weight.device and tensor.is_contiguous()


def test_int4_refuses_a_weight_whose_inputs_are_not_whole_groups() -> None:
    with pytest.raises(ValueError, match=r"\(64, 576\).*group sizes that divide 576: \[32, 64\]"):
        Int4WeightOnly(128).prepare(random_weight(64, 576))
    with pytest.raises(ValueError, match="allowed"):
        Int4WeightOnly(group_size=48)
    assert set(INT4_GROUP_SIZES) >= {32, 64, 128}


@pytest.mark.parametrize("method", quantization_methods(native_fp8=False) + [FP8Weight(native_fp8=True)],
                         ids=lambda method: f"{method.name}-{getattr(method, 'native_fp8', '')}")
def test_meta_device_gives_the_shape_and_dtype_without_running_anything(method) -> None:
    prepared = method.prepare(torch.empty(64, 128, device="meta", dtype=torch.bfloat16))
    for x in (torch.empty(7, 128, device="meta", dtype=torch.bfloat16),
              torch.empty(2, 3, 128, device="meta", dtype=torch.float16)):
        y = method.matmul(x, prepared)
        assert y.device.type == "meta" and y.shape == (*x.shape[:-1], 64) and y.dtype == x.dtype


@pytest.mark.parametrize("method", quantization_methods(native_fp8=True), ids=lambda method: method.name)
def test_matmul_traces_whole_under_torch_compile(method) -> None:
    torch._dynamo.reset()
    prepared = method.prepare(random_weight(48, 128).to(torch.bfloat16))
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    compiled = torch.compile(lambda x: method.matmul(x, prepared), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), method.matmul(x, prepared), rtol=0, atol=0)


def test_quantization_methods_are_the_three_names_with_the_plugins_fp8_capability() -> None:
    for native in (False, True):
        methods = {method.name: method for method in quantization_methods(native_fp8=native)}
        assert set(methods) == {"int8", "int4", "fp8"}
        assert methods["fp8"].native_fp8 is native


@pytest.mark.parametrize("rows", [1, 33])
def test_native_fp8_is_the_scaled_mm_of_per_token_fp8_activations(rows) -> None:
    # Native fp8 quantizes the activations too (W8A8): its contract is against the product of the
    # fp8-rounded activations with the fp8 weight. torch._scaled_mm runs on CPU as well.
    method = FP8Weight(native_fp8=True)
    prepared = method.prepare(random_weight(48, 128).to(torch.bfloat16))
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    assert method.uses_scaled_mm(x, prepared)
    x_fp8, x_scales = quantize_activations_fp8(x)
    got = method.matmul(x, prepared)
    assert got.dtype == torch.bfloat16
    assert method.dequantize(prepared) is None, "no dense weight stands for a product that quantizes x"
    assert_at_least_as_exact_as_f_linear(got, x_fp8.double() * x_scales.double(), fp8_weight(prepared),
                                         f"native fp8 rows={rows}")
    error, _, norm = errors_against_exact(got, x, fp8_weight(prepared))
    assert error / norm < 0.05, "per-token fp8 activations stay within a few percent of x"


def test_native_fp8_takes_the_triton_kernel_where_scaled_mm_cannot_run() -> None:
    native, dequantizing = FP8Weight(native_fp8=True), FP8Weight(native_fp8=False)
    for out_features, dtype in [(48, torch.float16), (48, torch.float32), (40, torch.bfloat16)]:
        prepared = native.prepare(random_weight(out_features, 128).to(dtype))
        x = torch.randn(5, 128).to(dtype)
        assert not native.uses_scaled_mm(x, prepared)
        torch.testing.assert_close(native.matmul(x, prepared), dequantizing.matmul(x, prepared), rtol=0, atol=0)


CONSTEXPRS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "DOT_F32", "GROUP_SIZE"}


def _signature(kernel, dtype: str) -> dict[str, str]:
    """What the launcher passes: activation and output pointers in `dtype`, the weight's bytes, float32
    scales, uint8 zero points, and int32 sizes and strides."""
    pointers = {"X": f"*{dtype}", "Y": f"*{dtype}", "S": "*fp32", "Z": "*u8",
                "W": "*i8" if kernel is quant_kernels.int8_matmul_kernel else "*u8"}
    return {name: pointers.get(name, "i32") for name in kernel.arg_names if name not in CONSTEXPRS}


@pytest.mark.aot
def test_every_kernel_compiles_for_the_gpu_targets_at_the_launchers_tiles() -> None:
    from tokenmill.plugins.triton.aot import TARGETS, compile_kernels

    jobs = []
    for rows in (1, 4096):  # the decode and the prefill tiles
        block_m, block_n, block_k = quant_kernels.tile_sizes(rows)
        tiles = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "DOT_F32": False}
        for target in TARGETS.values():
            # fp16 compiles like bf16 but for its conversions: one target is enough to check it.
            for dtype in ("bf16", "fp16") if rows == 1 and target == TARGETS["sm_80"] else ("bf16",):
                jobs += [(quant_kernels.int8_matmul_kernel, _signature(quant_kernels.int8_matmul_kernel, dtype),
                          tiles, target),
                         (quant_kernels.fp8_matmul_kernel, _signature(quant_kernels.fp8_matmul_kernel, dtype),
                          tiles, target)]
                for group_size in (32, 128) if rows == 1 else (128,):
                    int4_tiles = {**tiles, "BLOCK_K": quant_kernels.tile_sizes(rows, group_size)[2],
                                  "GROUP_SIZE": group_size}
                    jobs.append((quant_kernels.int4_matmul_kernel,
                                 _signature(quant_kernels.int4_matmul_kernel, dtype), int4_tiles, target))
    fp32_cuda = [(kernel, _signature(kernel, "fp32"), {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64,
                                                       "DOT_F32": False, **extra}, TARGETS["sm_90a"])
                 for kernel, extra in [(quant_kernels.int8_matmul_kernel, {}), (quant_kernels.fp8_matmul_kernel, {}),
                                       (quant_kernels.int4_matmul_kernel, {"GROUP_SIZE": 64})]]
    compiled = compile_kernels(jobs + fp32_cuda)
    for (kernel, _, constexprs, target), binary in zip(jobs + fp32_cuda, compiled):
        assert binary.asm.get("cubin") or binary.asm.get("hsaco"), f"{kernel.__name__} {constexprs} {target}"
    for binary in compiled[len(jobs):]:
        # float32 activations must be multiplied in full float32, as F.linear does, never as tf32.
        assert "tf32" not in binary.asm["ptx"]


def test_int4_without_a_group_size_takes_the_largest_that_divides_each_layer() -> None:
    method = Int4WeightOnly()
    assert method.prepare(torch.randn(8, 576)).group_size == 64  # SmolLM2-135M's hidden size
    assert method.prepare(torch.randn(8, 1536)).group_size == 128
    with pytest.raises(ValueError, match="group sizes that divide 100: none"):
        method.prepare(torch.randn(8, 100))
