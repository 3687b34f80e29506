"""`tokenmill env`: every registered backend plugin, its status, devices, versions, and the choice."""

from __future__ import annotations

import json
import platform
from typing import Any

from tokenmill.errors import BackendUnavailableError, TokenmillError
from tokenmill.probe import installed_version
from tokenmill.registry import BackendRegistry, PluginReport

CORE_DISTRIBUTIONS = ("tokenmill", "torch", "transformers", "tokenizers", "pluggy", "gguf", "safetensors")
IMPLEMENTATIONS = {
    "tokenmill": "tokenmill's own implementation",
    "transformers": "no tokenmill implementation: the transformers fallback (transformers' modeling code, "
                    "tokenmill's paged attention)",
}


def _gib(n: int | None) -> str:
    return "?" if not n else f"{n / (1 << 30):.1f} GiB"


def model_report(model_id: str) -> dict[str, Any]:
    """Whose code would run `model_id` ("" or None: the embedded model), from its config alone."""
    from tokenmill.loader import load_config
    from tokenmill.models import get_model_class, model_implementation

    report: dict[str, Any] = {"model_id": model_id or "(embedded default)", "architectures": [],
                              "model_implementation": None, "reason": None}
    try:
        config = load_config(model_id or None)
        report["architectures"] = list(getattr(config, "architectures", None) or [])
        implementation = model_implementation(get_model_class(config))
    except (TokenmillError, OSError, ValueError) as exc:  # unreadable, or an architecture nothing runs
        report["reason"] = str(exc)
        return report
    report["model_implementation"] = implementation
    report["reason"] = IMPLEMENTATIONS[implementation]
    return report


def build_report(registry: BackendRegistry, forced: str | None = None, model_id: str | None = None) -> dict[str, Any]:
    """The whole report as plain data (what `--json` prints); with `model_id` ("" for the embedded model),
    also whose code would run that model."""
    plugins = []
    for report in registry.reports().values():
        d = report.discovery
        plugins.append({
            "name": report.name,
            "source": report.source,
            "distribution": report.distribution,
            "status": d.status.value,
            "usable": report.is_selectable,
            "reason": d.reason,
            "priority": d.priority,
            "install": f"pip install 'tokenmill[{d.install_extra}]'" if d.install_extra and not d.is_usable else None,
            "devices": [
                {"index": dev.index, "name": dev.name, "total_memory_bytes": dev.total_memory_bytes,
                 "free_memory_bytes": dev.free_memory_bytes, "properties": dict(dev.properties)}
                for dev in d.devices
            ],
            "versions": dict(d.versions),
        })
    try:
        selection = registry.select(forced)
        chosen = {"name": selection.name, "reason": selection.reason}
    except BackendUnavailableError as exc:
        chosen = {"name": None, "reason": str(exc)}
    versions = {name: installed_version(name) or "not installed" for name in CORE_DISTRIBUTIONS}
    versions["python"] = platform.python_version()
    report = {"versions": versions, "plugins": plugins, "chosen": chosen}
    if model_id is not None:
        report["model"] = model_report(model_id)
    return report


def _plugin_lines(plugin: dict[str, Any]) -> list[str]:
    mark = "*" if plugin["usable"] else "-"
    lines = [f"  {mark} {plugin['name']:<10} {plugin['status']:<22} priority {plugin['priority']:>4}  "
             f"({plugin['distribution'] or plugin['source']})",
             f"      {plugin['reason']}"]
    if plugin["install"]:
        lines.append(f"      to install its library: {plugin['install']}")
    for dev in plugin["devices"]:
        lines.append(f"      device {dev['index']}: {dev['name']}, {_gib(dev['total_memory_bytes'])} total, "
                     f"{_gib(dev['free_memory_bytes'])} free")
        lines.extend(f"        {key}: {value}" for key, value in dev["properties"].items())
    vendor = {k: v for k, v in plugin["versions"].items() if k not in ("torch", "python")}
    if vendor:
        lines.append("      " + ", ".join(f"{k} {v}" for k, v in vendor.items()))
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report for a person: versions, one block per plugin, then the choice."""
    lines = ["tokenmill environment", "", "Versions:"]
    lines += [f"  {name:<13} {version}" for name, version in report["versions"].items()]
    lines += ["", "Backend plugins (* = usable):"]
    for plugin in report["plugins"]:
        lines += _plugin_lines(plugin)
    chosen = report["chosen"]
    if "model" in report:
        model = report["model"]
        lines += ["", f"Model: {model['model_id']} ({', '.join(model['architectures']) or 'architecture unknown'})",
                  f"  model_implementation: {model['model_implementation'] or 'none'} ({model['reason']})"]
    lines.append("")
    if chosen["name"]:
        lines.append(f"Chosen backend: {chosen['name']} ({chosen['reason']})")
    else:
        lines.append(f"Chosen backend: none ({chosen['reason']})")
    return "\n".join(lines)


def print_report(registry: BackendRegistry, forced: str | None, as_json: bool, model_id: str | None = None) -> None:
    report = build_report(registry, forced, model_id)
    print(json.dumps(report, indent=2) if as_json else format_report(report))
