"""Every "no" of the GPU plugins' discovery, with a reason and the extra to install, never "discovery failed".

The discovery code runs for real; only the facts it reads (torch's build, device counts, which vendor
modules import) are patched to those of the machines it must explain.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tokenmill.interfaces import BackendStatus
from tokenmill.plugins.cuda import discover as cuda
from tokenmill.plugins.rocm import discover as rocm
from tokenmill.plugins.xpu import discover as xpu
from tokenmill.probe import module_available

GPU_PLUGINS = ("cuda", "rocm", "xpu")


@pytest.fixture()
def torch_build(monkeypatch):
    """Set the torch build to look like: cpu, cuda or rocm; device counts start at 0."""
    def set_build(kind: str, devices: int = 0) -> None:
        monkeypatch.setattr(torch.version, "cuda", "12.8" if kind == "cuda" else None)
        monkeypatch.setattr(torch.version, "hip", "6.4.43482" if kind == "rocm" else None)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    return set_build


def _is_explained_no(discovery, status: BackendStatus) -> None:
    assert discovery.status is status, discovery
    assert discovery.reason and discovery.status is not BackendStatus.ERROR


# ---- cuda ---------------------------------------------------------------------------------------------

def test_cuda_on_a_torch_without_cuda_names_the_extra(torch_build) -> None:
    torch_build("cpu")
    found = cuda.discover()
    _is_explained_no(found, BackendStatus.LIBRARY_MISSING)
    assert "built without CUDA" in found.reason and found.install_extra == "cuda"


def test_cuda_on_a_rocm_torch_points_at_the_rocm_backend(torch_build) -> None:
    torch_build("rocm", devices=2)
    found = cuda.discover()
    _is_explained_no(found, BackendStatus.NO_DEVICE)
    assert "ROCm (HIP) build" in found.reason and "rocm backend" in found.reason


def test_cuda_build_without_nvml_and_no_gpu(torch_build, monkeypatch) -> None:
    torch_build("cuda")
    monkeypatch.setattr(cuda, "module_available", lambda name: False)
    found = cuda.discover()
    _is_explained_no(found, BackendStatus.NO_DEVICE)
    assert "no NVIDIA GPU visible" in found.reason and "nvidia-ml-py is not installed" in found.reason
    assert found.install_extra == "cuda"


@pytest.mark.skipif(not module_available("pynvml"), reason="needs nvidia-ml-py (tokenmill[test])")
def test_cuda_build_with_nvml_but_no_driver(torch_build) -> None:
    torch_build("cuda")
    found = cuda.discover()  # the real pynvml: its nvmlInit finds no libnvidia-ml.so here
    _is_explained_no(found, BackendStatus.NO_DEVICE)
    assert "NVML did not answer" in found.reason


def test_cuda_build_without_nvml_still_counts_gpus(torch_build, monkeypatch) -> None:
    torch_build("cuda", devices=2)
    monkeypatch.setattr(cuda, "module_available", lambda name: False)
    found = cuda.discover()
    assert found.status is BackendStatus.USABLE and len(found.devices) == 2
    assert "nvidia-ml-py is not installed" in found.reason


# ---- rocm ---------------------------------------------------------------------------------------------

def test_rocm_on_a_torch_without_hip_names_the_extra(torch_build) -> None:
    torch_build("cpu")
    found = rocm.discover()
    _is_explained_no(found, BackendStatus.LIBRARY_MISSING)
    assert "not a ROCm build" in found.reason and found.install_extra == "rocm"


def test_rocm_build_without_amdsmi(torch_build, monkeypatch) -> None:
    torch_build("rocm")
    monkeypatch.setattr(rocm, "module_available", lambda name: False)
    found = rocm.discover()
    _is_explained_no(found, BackendStatus.NO_DEVICE)
    assert "amdsmi is not installed" in found.reason and found.install_extra == "rocm"


@pytest.mark.skipif(not module_available("amdsmi"), reason="needs amdsmi (tokenmill[test])")
def test_rocm_build_with_amdsmi_but_no_library_is_a_quiet_no(torch_build, capfd) -> None:
    torch_build("rocm")
    found = rocm.discover()  # the real amdsmi package: its import fails to find libamd_smi.so here
    _is_explained_no(found, BackendStatus.NO_DEVICE)
    assert "libamd_smi.so" in found.reason
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""


def test_rocm_amdsmi_whose_import_prints_and_raises(torch_build, monkeypatch, tmp_path: Path, capfd) -> None:
    """What amdsmi does without its C library, reproduced where the package is not installed."""
    (tmp_path / "amdsmi.py").write_text(textwrap.dedent("""
        print("/opt/rocm/lib/libamd_smi.so: cannot open shared object file")
        print("Unable to find libamd_smi.so library try installing amd-smi-lib from your package manager")
        raise KeyError("libamd_smi.so")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)
    torch_build("rocm", devices=1)
    found = rocm.discover()
    assert found.status is BackendStatus.USABLE and len(found.devices) == 1  # HIP still counts the GPU
    assert "Unable to find libamd_smi.so" in found.reason  # what amdsmi printed becomes the reason
    assert capfd.readouterr().out == ""


# ---- xpu ----------------------------------------------------------------------------------------------

def test_xpu_on_a_torch_without_xpu_names_the_extra(monkeypatch) -> None:
    monkeypatch.setattr(torch.xpu, "_is_compiled", lambda: False)
    monkeypatch.setattr(xpu, "module_available", lambda name: False)
    found = xpu.discover()
    _is_explained_no(found, BackendStatus.LIBRARY_MISSING)
    assert "no XPU support" in found.reason and found.install_extra == "xpu"


def test_xpu_compiled_but_no_device(monkeypatch) -> None:
    monkeypatch.setattr(torch.xpu, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    found = xpu.discover()
    _is_explained_no(found, BackendStatus.NO_DEVICE)
    assert "no Intel GPU visible" in found.reason and found.install_extra == "xpu"


def test_xpu_runtime_that_raises_is_a_no_with_its_message(monkeypatch) -> None:
    def broken() -> bool:
        raise RuntimeError("level zero driver not loaded")

    monkeypatch.setattr(torch.xpu, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch.xpu, "is_available", broken)
    found = xpu.discover()
    _is_explained_no(found, BackendStatus.NO_DEVICE)
    assert "level zero driver not loaded" in found.reason


# ---- tokenmill env, as a user runs it ----------------------------------------------------------------

def test_env_json_explains_every_gpu_no_with_its_extra() -> None:
    report = json.loads(run_cli("env", "--json").stdout)
    plugins = {p["name"]: p for p in report["plugins"]}
    for name in GPU_PLUGINS:
        plugin = plugins[name]
        assert plugin["status"] in (BackendStatus.LIBRARY_MISSING.value, BackendStatus.NO_DEVICE.value), plugin
        assert plugin["reason"] and plugin["install"] == f"pip install 'tokenmill[{name}]'"


def test_env_json_stays_json_on_a_rocm_torch_without_rocm() -> None:
    """A ROCm wheel on a machine without ROCm: amdsmi's import prints, and must not reach stdout."""
    code = ("import sys, torch; torch.version.hip = '6.4.43482'; torch.version.cuda = None; "
            "from tokenmill.cli import main; sys.exit(main(['env', '--json']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["rocm"]["status"] == BackendStatus.NO_DEVICE.value
    assert plugins["rocm"]["install"] == "pip install 'tokenmill[rocm]'"
    assert plugins["cuda"]["status"] == BackendStatus.NO_DEVICE.value and "rocm backend" in plugins["cuda"]["reason"]
    if module_available("amdsmi"):
        assert "libamd_smi.so" in plugins["rocm"]["reason"]
