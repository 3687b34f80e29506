"""The gaudi backend's discovery: every "no" explained, and never an import of the Gaudi runtime.

The discovery code runs for real; only what it reads (installed modules, device files, HLML) is patched
to the machines it must explain.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tokenmill.interfaces import BackendStatus, DeviceInfo
from tokenmill.plugins.gaudi import discover as gaudi
from tokenmill.registry import load_registry


@pytest.fixture()
def machine(monkeypatch):
    """Make discovery see: the runtime installed or not, these device files, these HLML devices (None: no HLML)."""
    def set_machine(runtime: bool, files: list[str], hlml: tuple[DeviceInfo, ...] | None = None) -> None:
        monkeypatch.setattr(gaudi, "module_available", lambda name: runtime and name == "habana_frameworks")
        monkeypatch.setattr(gaudi, "device_files", lambda *patterns: files)
        monkeypatch.setattr(gaudi, "_hlml_devices", lambda: hlml)
    return set_machine


def test_without_the_runtime_it_names_the_library_and_the_extra(machine) -> None:
    machine(runtime=False, files=[])
    found = gaudi.discover()
    assert found.status is BackendStatus.LIBRARY_MISSING and found.install_extra == "gaudi"
    assert "habana_frameworks" in found.reason and "no Gaudi device files" in found.reason


def test_with_the_runtime_and_no_card_it_says_no_device(machine) -> None:
    machine(runtime=True, files=[])
    found = gaudi.discover()
    assert found.status is BackendStatus.NO_DEVICE and "HABANA_VISIBLE_DEVICES" in found.reason


def test_with_cards_it_is_usable_complete_and_chosen_over_the_cpu(machine) -> None:
    machine(runtime=True, files=["/dev/accel/accel0", "/dev/accel/accel1"])
    found = gaudi.discover()
    assert found.status is BackendStatus.USABLE and len(found.devices) == 2
    registry = load_registry()
    report = registry.reports()["gaudi"]
    assert report.is_selectable, report.discovery  # every hook the engine needs is there: not "incomplete"
    assert registry.select().name == "gaudi"


def test_hlml_devices_are_preferred_to_device_files(machine) -> None:
    machine(runtime=True, files=["/dev/accel/accel0"], hlml=(DeviceInfo(0, "HL-225", 96 << 30, 90 << 30),))
    assert gaudi.discover().devices[0].name == "HL-225"


def test_loading_and_discovering_never_runs_the_runtime(tmp_path: Path) -> None:
    # An installed habana_frameworks whose import leaves a mark: discovery may find it, never import it.
    package = tmp_path / "habana_frameworks"
    package.mkdir()
    mark = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    code = textwrap.dedent("""
        from tokenmill.registry import load_registry
        print(load_registry().reports()["gaudi"].discovery.status.name)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] in ("NO_DEVICE", "USABLE")  # found through its spec alone
    assert not mark.exists()
