"""The pytest plugin behind `tokenmill conformance`: the `--tokenmill-backend` option and fixtures."""

from __future__ import annotations

import pytest
import torch

from tokenmill.backend import Backend, resolve_backend
from tokenmill.errors import BackendUnavailableError
from tokenmill.interfaces import DevicePlatform, Discovery


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--tokenmill-backend", required=True, help="the backend plugin under test")


def pytest_report_header(config: pytest.Config) -> str:
    return f"tokenmill conformance: backend {config.getoption('--tokenmill-backend')!r}"


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> Backend:
    """The backend under test, resolved exactly as the engine resolves it."""
    try:
        resolved, _ = resolve_backend(forced=request.config.getoption("--tokenmill-backend"))
    except BackendUnavailableError as exc:
        pytest.fail(str(exc), pytrace=False)
    return resolved


@pytest.fixture(scope="session")
def discovery(backend: Backend) -> Discovery:
    return backend.registry.reports()[backend.name].discovery


@pytest.fixture(scope="session")
def platform(backend: Backend) -> DevicePlatform:
    return backend.init_device(0)


@pytest.fixture(scope="session")
def device(platform: DevicePlatform) -> torch.device:
    return platform.device


def dtypes_under_test(platform: DevicePlatform) -> list[torch.dtype]:
    """float32 (tight tolerance) and the device's preferred dtype, where the backend supports them."""
    dtypes = [d for d in (torch.float32, platform.preferred_dtype) if d in platform.supported_dtypes]
    return list(dict.fromkeys(dtypes))
