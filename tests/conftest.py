"""Shared fixtures: the example out-of-tree plugin installed into this venv, a CLI runner, and transformers'
own load of the embedded SmolLM2."""

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


@pytest.fixture(scope="session")
def transformers_smollm2():
    """transformers' float32 SmolLM2 from its own GGUF loader, loaded once for the whole suite.

    The load takes 30-40 s on two cores (transformers parses the GGUF's tokenizer field in Python, twice);
    the tests that compare against it only read it (a bf16 run works on a copy: see `bf16_copy`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from tokenmill.loader import default_model_path

    path = Path(default_model_path())
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def bf16_copy(model):
    """A bfloat16 copy of a float32 model: the very weights transformers' own bf16 load gives (the GGUF is
    dequantized to float32 either way, then rounded to nearest), without the second load."""
    import copy

    import torch

    return copy.deepcopy(model).to(torch.bfloat16)
