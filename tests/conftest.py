"""Shared fixtures: the example out-of-tree plugin installed into this venv, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# No GPU here: the shared Triton kernels of the GPU backends run under Triton's interpreter on CPU tensors.
# Triton reads this when a kernel module is imported, so it is set before any test imports one.
os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_PLUGIN = REPO / "examples" / "tokenmill-example-backend"


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `tokenmill ARGS` in a subprocess of this venv's Python."""
    result = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"tokenmill {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def example_plugin_installed() -> None:
    """pip-install the example vendor package into the test venv, as a vendor's user would."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(EXAMPLE_PLUGIN)],
        check=True, timeout=600,
    )
