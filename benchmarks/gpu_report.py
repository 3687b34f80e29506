"""The GPU check's results: one JSON file rewritten after every measurement, and the Markdown read of it.

Steps run in child processes that may be killed at their time limit, so nothing is held back in
memory: each result is written to `gpu_check.json` (atomically, by rename) the moment it exists, and
`GPU_REPORT.md` is rendered from the JSON each time, so whatever is on disk is the latest word.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

JSON_NAME = "gpu_check.json"
REPORT_NAME = "GPU_REPORT.md"


class Results:
    """`gpu_check.json` in `out_dir`: a section per step, each a flat dict of named results."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / JSON_NAME

    def load(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def update(self, section: str, key: str, value: Any) -> None:
        data = self.load()
        data.setdefault(section, {})[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, self.path)
        (self.out_dir / REPORT_NAME).write_text(render(data))

    def recorder(self, section: str):
        return lambda key, value: self.update(section, key, value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _errors(section: dict[str, Any]) -> list[str]:
    return [f"- `{key}`: {value}" for key, value in section.items() if key.endswith("error")]


def _machine(data: dict[str, Any]) -> list[str]:
    machine = data.get("machine", {})
    return ["## Machine", ""] + [f"- {key}: {value}" for key, value in machine.items()] + [""]


def _steps(data: dict[str, Any]) -> list[str]:
    rows = [[name, info.get("status"), info.get("seconds"), info.get("note", "")]
            for name, info in data.get("steps", {}).items()]
    return ["## Steps", ""] + _table(["step", "status", "seconds", "note"], rows) + [""]


def _conformance(data: dict[str, Any]) -> list[str]:
    conf = data.get("conformance")
    if not conf:
        return []
    lines = ["## Conformance", "", f"`{conf.get('command')}`: exit {conf.get('exit_code')}, "
             f"{conf.get('passed', 0)} passed, {conf.get('failed', 0)} failed, {conf.get('errors', 0)} errors, "
             f"{conf.get('skipped', 0)} skipped", ""]
    if conf.get("failure_tail"):
        lines += ["```", conf["failure_tail"], "```", ""]
    return lines + _errors(conf)


def _identity(data: dict[str, Any]) -> list[str]:
    lines = []
    tiny = data.get("identity_tiny", {})
    rows = [[name, r["dtype"], f"{r['batched_equal']}/{r['prompts']}", f"{r['alone_equal']}/{r['prompts']}",
             r.get("first_difference", "")]
            for name, r in tiny.items() if isinstance(r, dict) and "prompts" in r]
    if tiny:
        lines += ["## Greedy identity: tiny models vs transformers, same device", ""]
        lines += _table(["model", "dtype", "batched equal", "alone equal", "first difference"], rows) + [""]
        lines += _errors(tiny)
    smol = data.get("identity_smollm2", {})
    if smol:
        lines += ["", "## Greedy identity: embedded SmolLM2 vs transformers float32", ""]
        rows = [[name, r.get("dtype"), f"{r.get('equal', '-')}/{r.get('prompts')}", r.get("common_prefix", ""),
                 r.get("new_tokens", "")]
                for name, r in smol.items() if isinstance(r, dict) and "prompts" in r]
        lines += _table(["run", "dtype", "token-identical", "common prefix per prompt", "new tokens"], rows) + [""]
        lines += [f"- {key}: {value}" for key, value in smol.items() if not isinstance(value, dict)]
    return lines + [""]


def _latency(data: dict[str, Any]) -> list[str]:
    lat = data.get("decode_latency_8b")
    if not lat:
        return []
    lines = ["## Batch-1 decode, Llama-3-8B shape (bf16, random weights, CUDA graphs)", ""]
    lines += [f"- {key}: {value}" for key, value in lat.items()]
    return lines + [""]


def _throughput(data: dict[str, Any], section: str, title: str) -> list[str]:
    thr = data.get(section)
    if not thr:
        return []
    lines = [f"## Throughput, {title}", "", f"- workload: {thr.get('workload')}", ""]
    tm, hf = thr.get("tokenmill", {}), thr.get("transformers", {})
    rows = []
    for level in sorted({*tm, *hf}, key=int):
        ours, theirs = tm.get(level, {}), hf.get(level, {})
        best = theirs.get("best_tokens_per_s")
        ratio = round(ours["tokens_per_s"] / best, 2) if ours.get("tokens_per_s") and best else ""
        rows.append([level, ours.get("tokens_per_s", ours.get("error", "")), best or theirs.get("error", ""),
                     theirs.get("best_variant", ""), ratio])
    lines += _table(["concurrency", "tokenmill tok/s", "transformers tok/s", "transformers variant", "ratio"], rows)
    return lines + [""] + _errors(thr) + [""]


def render(data: dict[str, Any]) -> str:
    """The human report of `gpu_check.json`'s contents, whatever subset of it exists yet."""
    lines = ["# tokenmill GPU check", "", f"Mode: {data.get('run', {}).get('mode', '?')}, backend "
             f"{data.get('run', {}).get('backend', '?')}. Raw numbers: `{JSON_NAME}`.", ""]
    lines += _machine(data) + _steps(data) + _conformance(data) + _identity(data) + _latency(data)
    lines += _throughput(data, "throughput_smollm2", "embedded SmolLM2-135M (bf16)")
    lines += _throughput(data, "throughput_8b", "Llama-3-8B shape (bf16, random weights)")
    return "\n".join(lines) + "\n"
