"""The pytest plugin behind `tokenmill conformance`: the `--tokenmill-backend` option and fixtures."""

from __future__ import annotations

import pytest
import torch

from tokenmill import hookspecs
from tokenmill.backend import Backend, resolve_backend
from tokenmill.errors import BackendUnavailableError
from tokenmill.interfaces import DevicePlatform, Discovery
from tokenmill.registry import load_registry


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--tokenmill-backend", required=True, help="the backend plugin under test")
    parser.addoption("--tokenmill-interpret", action="store_true",
                     help="run the kernels through the backend's interpreter on the CPU (kernel cases only)")


def pytest_report_header(config: pytest.Config) -> str:
    mode = ", interpreted on the CPU" if config.getoption("--tokenmill-interpret") else ""
    return f"tokenmill conformance: backend {config.getoption('--tokenmill-backend')!r}{mode}"


def interpreted_backend(name: str) -> tuple[Backend, DevicePlatform]:
    """`name`'s backend with its interpreter on, whether or not its hardware is here."""
    registry = load_registry()
    if name not in registry.names:
        raise BackendUnavailableError(f"no backend named {name!r} is registered")
    backend = Backend(registry, name)
    platform = backend.interpreter_platform()
    if platform is None:
        raise BackendUnavailableError(f"backend {name!r} offers no kernel interpreter (tokenmill_interpreter_platform)")
    return backend, platform


@pytest.fixture(scope="session")
def _resolved(request: pytest.FixtureRequest) -> tuple[Backend, DevicePlatform | None]:
    name = request.config.getoption("--tokenmill-backend")
    try:
        if request.config.getoption("--tokenmill-interpret"):
            return interpreted_backend(name)
        resolved, _ = resolve_backend(forced=name)
    except BackendUnavailableError as exc:
        pytest.fail(str(exc), pytrace=False)
    return resolved, None


@pytest.fixture(scope="session")
def backend(_resolved) -> Backend:
    """The backend under test, resolved exactly as the engine resolves it (or loaded to interpret)."""
    return _resolved[0]


@pytest.fixture(scope="session")
def discovery(backend: Backend) -> Discovery:
    return backend.registry.reports()[backend.name].discovery


@pytest.fixture(scope="session")
def platform(_resolved) -> DevicePlatform:
    backend, interpreted = _resolved
    return interpreted if interpreted is not None else backend.init_device(0)


@pytest.fixture(scope="session")
def device(platform: DevicePlatform) -> torch.device:
    return platform.device


def has_paged_cache(backend: Backend) -> bool:
    """Whether the backend gives a paged KV-cache layout and attention, rather than running its own model."""
    plugin = backend.registry.plugin(backend.name)
    return all(hasattr(plugin, hook) for hook in hookspecs.PAGED_CACHE_HOOKS)


@pytest.fixture(autouse=True)
def _skip_paged_cache_cases(request: pytest.FixtureRequest) -> None:
    # Decided by the hooks the backend implements (a capability), never by its name.
    if request.node.get_closest_marker("paged_cache") is None:
        return
    backend = request.getfixturevalue("backend")
    if not has_paged_cache(backend):
        pytest.skip("the backend runs its own model, which owns its KV cache (tokenmill_model_executor): it has no "
                    "paged layout, attention kernels, cache budget or core-model sharding to check")


def dtypes_under_test(platform: DevicePlatform) -> list[torch.dtype]:
    """float32 (tight tolerance) and the device's preferred dtype, where the backend supports them."""
    dtypes = [d for d in (torch.float32, platform.preferred_dtype) if d in platform.supported_dtypes]
    return list(dict.fromkeys(dtypes))
