"""`tokenmill conformance --backend NAME --interpret`: the kernel-level suite on the CPU, as CI runs it."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


def test_the_cuda_kernels_pass_every_kernel_case_of_the_conformance_suite() -> None:
    result = run_cli("conformance", "--backend", "cuda", "--interpret", "-q")
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, result.stdout[-3000:]


@pytest.mark.parametrize("backend", ["rocm", "xpu"])
def test_rocm_and_xpu_run_the_same_kernels_interpreted(backend) -> None:
    # The kernels are cuda's (checked in full above); here, that these plugins load, hand them out and
    # pass a case of each kind without their hardware.
    result = run_cli("conformance", "--backend", backend, "--interpret", "-q",
                     "-k", "matches_reference[decode] or test_copy_blocks or test_silu_and_mul")
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, result.stdout[-3000:]


def test_a_backend_without_an_interpreter_is_refused_clearly() -> None:
    result = run_cli("conformance", "--backend", "cpu", "--interpret", check=False)
    assert result.returncode == 3
    assert "offers no kernel interpreter" in result.stderr
