"""`tokenmill env` and `tokenmill conformance` as a user runs them, in subprocesses."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

from tests.conftest import run_cli

ACCELERATORS = ("cuda", "rocm", "xpu", "gaudi", "neuron", "tpu")


def test_env_lists_every_plugin_and_chooses_cpu() -> None:
    report = json.loads(run_cli("env", "--json").stdout)
    plugins = {p["name"]: p for p in report["plugins"]}
    assert {"cpu", *ACCELERATORS} <= set(plugins)
    assert report["chosen"]["name"] == "cpu"
    assert plugins["cpu"]["usable"] and plugins["cpu"]["devices"]
    for name in ACCELERATORS:
        assert not plugins[name]["usable"]
        assert plugins[name]["reason"]
        assert plugins[name]["install"] == f"pip install 'tokenmill[{name}]'"
    assert report["versions"]["torch"].startswith("2.")


def test_env_text_names_the_choice_and_the_reasons() -> None:
    text = run_cli("env").stdout
    assert "Chosen backend: cpu" in text
    assert "pip install 'tokenmill[cuda]'" in text


def test_env_var_forces_a_backend_and_fails_clearly_when_unusable() -> None:
    env = {**os.environ, "TOKENMILL_BACKEND": "cuda"}
    report = json.loads(run_cli("env", "--json", env=env).stdout)
    assert report["chosen"]["name"] is None
    assert "not usable" in report["chosen"]["reason"]


def _write_fake_distribution(root: Path, name: str, module_source: str) -> None:
    """An installed-looking distribution on PYTHONPATH: a module plus its entry point metadata."""
    (root / f"{name}.py").write_text(textwrap.dedent(module_source))
    dist_info = root / f"{name}-0.0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[tokenmill.backends]\n{name} = {name}\n")


def test_broken_out_of_tree_plugins_are_refused_and_the_process_survives(tmp_path: Path) -> None:
    _write_fake_distribution(tmp_path, "typo_vendor", """
        from tokenmill import hookimpl
        @hookimpl
        def tokenmill_discover():
            raise RuntimeError("no driver")
        @hookimpl
        def tokenmill_attention(spec):
            return None
    """)
    _write_fake_distribution(tmp_path, "raising_vendor", """
        from tokenmill import hookimpl
        @hookimpl
        def tokenmill_discover():
            raise RuntimeError("driver exploded")
    """)
    _write_fake_distribution(tmp_path, "unimportable_vendor", "import a_module_that_does_not_exist\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = run_cli("env", "--json", env=env)
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["typo_vendor"]["status"] == "refused at load"
    assert "tokenmill_attention" in plugins["typo_vendor"]["reason"]
    assert "backend plugin 'typo_vendor'" in result.stderr  # the log names the refused plugin
    assert plugins["raising_vendor"]["status"] == "discovery failed"
    assert "driver exploded" in plugins["raising_vendor"]["reason"]
    assert plugins["unimportable_vendor"]["status"] == "refused at load"
    assert json.loads(result.stdout)["chosen"]["name"] == "cpu"


def test_conformance_passes_on_cpu() -> None:
    result = run_cli("conformance", "--backend", "cpu", "-q")
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_conformance_refuses_an_unusable_backend() -> None:
    result = run_cli("conformance", "--backend", "tpu", check=False)
    assert result.returncode != 0
    assert "tpu" in result.stderr and "not usable" in result.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "tokenmill"
    assert script.exists()
