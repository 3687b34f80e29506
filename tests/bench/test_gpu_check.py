"""The GPU check's whole flow in smoke mode on the CPU backend: every section lands in the JSON and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_writes_every_section(tmp_path) -> None:
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--backend", "cpu",
                          "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "gpu_check.log").read_text()
    data = json.loads((tmp_path / "gpu_check.json").read_text())

    assert {"run", "machine", "steps", "conformance", "identity_tiny", "identity_smollm2",
            "throughput_smollm2"} <= set(data)
    assert data["steps"]["llama8b"]["status"] == "skipped"
    assert all(data["steps"][name]["status"] == "ok" for name in ("machine", "conformance", "tiny", "smollm2"))
    assert data["conformance"]["passed"] > 0 and data["conformance"].get("failed", 0) == 0

    # float32 on the CPU backend is token-identical to transformers, batched and alone.
    for family in ("llama", "qwen2", "phi3"):
        tiny = data["identity_tiny"][family]
        assert tiny["batched_equal"] == tiny["alone_equal"] == tiny["prompts"]
    smol = data["identity_smollm2"]
    for run_name in ("float32 alone", "float32 batched"):
        assert smol[run_name]["equal"] == smol[run_name]["prompts"]
    assert len(smol["bfloat16 batched"]["common_prefix"]) == smol["bfloat16 batched"]["prompts"]

    throughput = data["throughput_smollm2"]
    for level in ("1", "4"):
        assert throughput["tokenmill"][level]["generated"] == int(level) * 8
        assert throughput["transformers"][level]["best_tokens_per_s"] > 0

    report = (tmp_path / "GPU_REPORT.md").read_text()
    for heading in ("## Machine", "## Conformance", "## Greedy identity", "## Throughput"):
        assert heading in report
