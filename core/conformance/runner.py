"""`tokenmill conformance`: run the packaged suite with pytest against one backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_conformance(backend: str, pytest_args: list[str], interpret: bool = False) -> int:
    """Run the suite in this package against `backend`; returns pytest's exit code.

    With `interpret`, only the kernel-level cases run, on the platform the backend's
    `tokenmill_interpreter_platform` gives (its kernels interpreted on host tensors), so a backend is
    checked where its hardware is absent; the backend then need not be usable here, only loadable.
    Interpreters are switched on through the environment before their kernels are defined (Triton's
    ``TRITON_INTERPRET``, which the hook sets here), so that suite runs in a fresh process inheriting it.
    """
    try:
        import pytest
    except ImportError:
        print("the conformance suite needs pytest: pip install 'tokenmill[test]'", file=sys.stderr)
        return 4
    if not backend:
        print("name the backend to test: tokenmill conformance --backend NAME", file=sys.stderr)
        return 4
    from tokenmill.backend import resolve_backend
    from tokenmill.conformance.plugin import interpreted_backend
    from tokenmill.errors import BackendUnavailableError

    try:
        if interpret:
            interpreted_backend(backend)
        else:
            resolve_backend(forced=backend)
    except BackendUnavailableError as exc:
        print(f"cannot run the conformance suite: {exc}", file=sys.stderr)
        return 3
    suite = Path(__file__).parent
    args = [
        str(suite),
        "-p", "tokenmill.conformance.plugin",
        f"--tokenmill-backend={backend}",
        *(["--tokenmill-interpret", "-m", "kernel"] if interpret else []),
        "--import-mode=importlib",
        "-p", "no:cacheprovider",
        f"--rootdir={suite}",
        "-c", str(suite / "pytest.ini"),
        *pytest_args,
    ]
    if interpret:
        return subprocess.call([sys.executable, "-m", "pytest", *args])
    return int(pytest.main(args))
