"""The shared Triton kernels, run by Triton's interpreter on CPU tensors and compiled for GPU targets.

TRITON_INTERPRET must be set before any `@triton.jit` module is imported; the root conftest sets it for
the whole suite, and it is set here too so this folder also runs on its own.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences Triton 3.9's deprecation warning

if importlib.util.find_spec("triton") is None:  # the `test` extra installs it; a bare install may not
    collect_ignore_glob = ["test_*.py"]


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "aot: ahead-of-time compilation for GPU targets (about a minute)")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CPU tensors under the interpreter; the GPU when the kernels really run (TRITON_INTERPRET unset)."""
    return torch.device("cpu") if os.environ.get("TRITON_INTERPRET") == "1" else torch.device("cuda")
