"""The out-of-tree example plugin, pip-installed into this venv: discovered, forceable, conformant."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("example_plugin_installed")


def test_example_plugin_is_discovered_but_cpu_still_wins() -> None:
    report = json.loads(run_cli("env", "--json").stdout)
    plugins = {p["name"]: p for p in report["plugins"]}
    assert plugins["example"]["usable"]
    assert plugins["example"]["distribution"] == "tokenmill-example-backend"
    assert report["chosen"]["name"] == "cpu"


def test_example_plugin_can_be_forced() -> None:
    report = json.loads(run_cli("env", "--json", "--backend", "example").stdout)
    assert report["chosen"]["name"] == "example"
    env = {**os.environ, "TOKENMILL_BACKEND": "example"}
    assert json.loads(run_cli("env", "--json", env=env).stdout)["chosen"]["name"] == "example"


def test_example_plugin_passes_the_conformance_suite() -> None:
    result = run_cli("conformance", "--backend", "example", "-q")
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_slot_example_plugin_passes_the_conformance_suite_skipping_only_paged_cache_cases() -> None:
    report = json.loads(run_cli("env", "--json").stdout)
    plugins = {p["name"]: p for p in report["plugins"]}
    assert plugins["example-slots"]["usable"]  # no paged-cache hooks: its model executor makes it complete
    result = run_cli("conformance", "--backend", "example-slots", "-q", "-rs")
    assert " passed" in result.stdout and "failed" not in result.stdout
    assert "token identity with the float32 reference" not in result.stdout  # it ran and passed, not skipped
    assert "owns its KV cache" in result.stdout  # the paged-cache cases skip, saying why
