"""`tokenmill conformance`: run the packaged suite with pytest against one backend."""

from __future__ import annotations

import sys
from pathlib import Path


def run_conformance(backend: str, pytest_args: list[str]) -> int:
    """Run the suite in this package against `backend`; returns pytest's exit code."""
    try:
        import pytest
    except ImportError:
        print("the conformance suite needs pytest: pip install 'tokenmill[test]'", file=sys.stderr)
        return 4
    if not backend:
        print("name the backend to test: tokenmill conformance --backend NAME", file=sys.stderr)
        return 4
    from tokenmill.backend import resolve_backend
    from tokenmill.errors import BackendUnavailableError

    try:
        resolve_backend(forced=backend)
    except BackendUnavailableError as exc:
        print(f"cannot run the conformance suite: {exc}", file=sys.stderr)
        return 3
    suite = Path(__file__).parent
    args = [
        str(suite),
        "-p", "tokenmill.conformance.plugin",
        f"--tokenmill-backend={backend}",
        "--import-mode=importlib",
        "-p", "no:cacheprovider",
        f"--rootdir={suite}",
        "-c", str(suite / "pytest.ini"),
        *pytest_args,
    ]
    return int(pytest.main(args))
