"""A regular (non-editable) install into a clean venv: the imports work, nothing stray lands."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {"core": "tokenmill", "api": "tokenmill.api", "plugins": "tokenmill.plugins"}


def _packages_on_disk() -> set[str]:
    found = set()
    for folder, package in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *rel.parts]) if rel.parts else package)
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert _packages_on_disk() <= listed


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(REPO)], check=True, timeout=600)
    return next(out.glob("tokenmill-*.whl"))


def test_wheel_holds_only_the_tokenmill_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"tokenmill", "tokenmill-0.1.0.dist-info"}
    assert "tokenmill/conformance/test_attention.py" in names
    assert "tokenmill/plugins/cpu/attention.py" in names
    assert {"tokenmill/api/static/dashboard.html", "tokenmill/api/static/dashboard.js"} <= set(names)


def test_clean_venv_regular_install_imports(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "clean"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # Dependencies come from this venv through a plain path entry: .pth files there (such as the editable
    # tokenmill finder) are not processed, so only the wheel provides tokenmill.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    before = {p.name for p in site.iterdir()}
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True, timeout=600)
    added = {p.name for p in site.iterdir()} - before
    assert added == {"tokenmill", "tokenmill-0.1.0.dist-info"}
    code = ("import tokenmill, tokenmill.api, tokenmill.plugins.cpu; from tokenmill.api.dashboard import STATIC; "
            "assert all((STATIC / f).is_file() for f in ('dashboard.html', 'dashboard.js')); "
            "print(tokenmill.__file__); print(tokenmill.plugins.cpu.__file__); print(STATIC)")
    printed = subprocess.check_output([str(python), "-c", code], text=True)
    assert all(line.startswith(str(site)) for line in printed.split())
    env_json = subprocess.check_output([str(env_dir / "bin" / "tokenmill"), "env", "--json"], text=True)
    assert '"name": "cpu"' in env_json


@pytest.mark.parametrize("backend", ["cuda", "rocm", "xpu"])
def test_vendor_conformance_workflow_runs_the_suite_on_its_hardware(backend: str) -> None:
    import yaml  # PyYAML comes with transformers
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / f"conformance-{backend}.yml").read_text())
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == ["self-hosted", backend]
    commands = "\n".join(step.get("run", "") for step in job["steps"])
    assert f"pip install '.[{backend},test]'" in commands
    assert f"tokenmill conformance --backend {backend}" in commands
    assert "tokenmill env" in commands
    assert "python3 -m venv" in commands
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "workflow_dispatch" in triggers
