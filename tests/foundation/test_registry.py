"""Plugin loading, validation, discovery and selection (in-process, with plugins registered directly)."""

from __future__ import annotations

import types

import pytest

from tokenmill import hookimpl
from tokenmill.errors import BackendUnavailableError
from tokenmill.interfaces import BackendStatus, Discovery
from tokenmill.registry import BackendRegistry, load_registry

ACCELERATORS = ("cuda", "rocm", "xpu", "gaudi", "neuron", "tpu")


def _plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


def _usable(priority: int):
    def tokenmill_discover():
        return Discovery(BackendStatus.USABLE, "test device", priority)
    return tokenmill_discover


def test_all_seven_in_tree_plugins_register_and_cpu_is_chosen() -> None:
    registry = load_registry()
    reports = registry.reports()
    assert {"cpu", *ACCELERATORS} <= set(reports)
    assert registry.select().name == "cpu"
    for name in ACCELERATORS:
        discovery = reports[name].discovery
        assert not reports[name].is_selectable
        assert discovery.status in (BackendStatus.LIBRARY_MISSING, BackendStatus.NO_DEVICE)
        assert discovery.reason
        assert discovery.install_extra == name


def test_a_plugin_with_an_unknown_hook_is_refused_with_its_name() -> None:
    registry = BackendRegistry()
    broken = _plugin(tokenmill_discover=_usable(1), tokenmill_attention_kernel=lambda: None)
    assert not registry.register("typo-backend", broken)
    report = registry.reports()["typo-backend"]
    assert report.discovery.status is BackendStatus.REFUSED
    assert "tokenmill_attention_kernel" in report.discovery.reason
    with pytest.raises(BackendUnavailableError, match="typo-backend"):
        registry.select("typo-backend")


def test_a_plugin_asking_for_an_argument_the_spec_lacks_is_refused() -> None:
    registry = BackendRegistry()
    broken = _plugin(tokenmill_discover=lambda verbose: None)
    assert not registry.register("bad-args", broken)
    assert "verbose" in registry.reports()["bad-args"].discovery.reason


def test_a_plugin_without_discovery_is_refused() -> None:
    registry = BackendRegistry()
    assert not registry.register("silent", _plugin(tokenmill_init_device=lambda device_index: None))
    assert "tokenmill_discover" in registry.reports()["silent"].discovery.reason


def test_an_unmarked_hook_function_is_refused() -> None:
    registry = BackendRegistry()
    plugin = types.SimpleNamespace(tokenmill_discover=_usable(1))
    assert not registry.register("unmarked", plugin)
    assert "hookimpl" in registry.reports()["unmarked"].discovery.reason


def test_a_raising_discovery_is_reported_not_raised() -> None:
    registry = load_registry()

    def tokenmill_discover():
        raise RuntimeError("driver exploded")

    assert registry.register("explosive", _plugin(tokenmill_discover=tokenmill_discover))
    report = registry.reports()["explosive"]
    assert report.discovery.status is BackendStatus.ERROR
    assert "driver exploded" in report.discovery.reason
    assert registry.select().name == "cpu"


def test_discovery_returning_the_wrong_type_is_an_error() -> None:
    registry = BackendRegistry()
    registry.register("liar", _plugin(tokenmill_discover=lambda: "usable!"))
    assert registry.reports()["liar"].discovery.status is BackendStatus.ERROR


def test_a_usable_plugin_missing_kernels_is_incomplete_and_never_chosen() -> None:
    registry = load_registry()
    registry.register("shiny", _plugin(tokenmill_discover=_usable(1000)))
    report = registry.reports()["shiny"]
    assert report.discovery.status is BackendStatus.INCOMPLETE
    assert "tokenmill_attention_backend" in report.discovery.reason
    assert registry.select().name == "cpu"
    with pytest.raises(BackendUnavailableError, match="shiny"):
        registry.select("shiny")


def test_priority_decides_among_usable_backends() -> None:
    import tokenmill.plugins.cpu as cpu

    registry = load_registry()
    faster = types.SimpleNamespace(**{n: getattr(cpu, n) for n in dir(cpu) if n.startswith("tokenmill_")})
    faster.tokenmill_discover = hookimpl(_usable(500))
    assert registry.register("faster", faster)
    selection = registry.select()
    assert selection.name == "faster"
    assert "priority" in selection.reason


def test_forcing_an_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(BackendUnavailableError, match="registered backends: .*cpu"):
        load_registry().select("nope")


def test_forcing_an_unusable_backend_says_why_and_what_to_install() -> None:
    with pytest.raises(BackendUnavailableError, match=r"cuda.*not usable.*tokenmill\[cuda\]"):
        load_registry().select("cuda")
