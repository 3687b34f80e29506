"""Shared fixtures: the example out-of-tree plugin installed into this venv, a CLI runner, and transformers'
own load of the embedded SmolLM2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

# No GPU here: the shared Triton kernels of the GPU backends run under Triton's interpreter on CPU tensors.
# Triton reads this when a kernel module is imported, so it is set before any test imports one.
os.environ.setdefault("TRITON_INTERPRET", "1")
# OpenMP threads (torch's and the CPU kernels') sleep at a barrier rather than spin. `make test` runs two
# pytest workers, and the servers tests start, on two cores: a thread spinning for a partner that another
# process has preempted burns the very core that partner needs. tests/engine/test_models.py took 190 s as
# two copies side by side spinning, 33 s sleeping (33 s alone either way). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
def example_plugin_installed(tmp_path_factory) -> None:
    """pip-install the example vendor package into the test venv, as a vendor's user would.

    Under pytest-xdist each worker asks for this fixture. The first installs, under a lock, and leaves a mark
    for this run; a second pip install could rewrite the package while another worker imports it.
    """
    run_folder = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        run_folder = run_folder.parent  # shared by this run's workers, fresh for every run
    mark = run_folder / "example-plugin-installed"
    with FileLock(str(run_folder / "example-plugin.lock")):
        if mark.exists():
            return
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             str(EXAMPLE_PLUGIN)],
            check=True, timeout=600,
        )
        mark.touch()


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


# The modules that take a minute or more on two cores, longest first. `make test` runs the suite on
# pytest-xdist workers, one module to a worker at a time and in collection order (--no-loadscope-reorder),
# so these start first: otherwise one worker is left finishing a long module while the other idles.
LONG_MODULES = (
    "tests/engine/test_smollm2.py",
    "tests/triton/test_interpret_conformance.py",
    "tests/foundation/test_example_plugin.py",
    "tests/bench/test_gpu_check.py",
    "tests/api/test_sharded_serving.py",
    "tests/loader/test_loader.py",
    "tests/reliability/test_openapi_fuzz.py",
    "tests/engine/test_tensor_parallel.py",
    "tests/triton/test_attention_kernels.py",
    "tests/foundation/test_cli.py",
    "tests/api/test_structured_smollm2.py",
    "tests/reliability/test_soak.py",
    "tests/reliability/test_replica_rejoin.py",
    "tests/api/test_replicas.py",
    "tests/api/test_sharded_smollm2.py",
    "tests/api/test_clients.py",
)


def pytest_collection_modifyitems(items) -> None:
    renamed = [module for module in LONG_MODULES if not (REPO / module).exists()]
    if renamed:
        raise pytest.UsageError(f"tests/conftest.py LONG_MODULES names modules that are gone: {renamed}")
    rank = {module: place for place, module in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
