"""Grafana dashboards against a live /metrics: every series a dashboard's PromQL selects is exposed.

The queries are parsed with promql-parser (Prometheus' own grammar), so a selector inside any function,
aggregation or binary expression is found, whatever its name looks like (`tgi_*`, `vllm:*`, `tokenmill_*`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
TOKENMILL_DASHBOARD = REPO / "deploy" / "grafana" / "tokenmill.json"
# Target labels Prometheus adds when it scrapes (Kubernetes discovery), not ones a server exports.
TARGET_LABELS = {"container", "instance", "job", "namespace", "pod"}
# Grafana replaces these before Prometheus sees the query; any valid range parses the same.
GRAFANA_RANGES = re.compile(r"\$__(rate_interval|interval|range)\b")


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every Prometheus target, rows' nested panels included."""
    queries = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            queries += [(inner["title"], target["expr"]) for target in inner.get("targets", []) if "expr" in target]
    return queries


def tokenmill_queries() -> list[tuple[str, str]]:
    return dashboard_queries(json.loads(TOKENMILL_DASHBOARD.read_text()))


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, label matchers other than target labels) of each series selector in `expr`."""
    found = []

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = [(m.name, str(m.op).rsplit(".", 1)[-1], m.value) for m in node.matchers.matchers
                        if m.name not in TARGET_LABELS and m.name != "__name__"]
            found.append((node.name, matchers))

    promql_parser.walk(promql_parser.parse(GRAFANA_RANGES.sub("1m", expr)), visit)
    return found


def _label_matches(value: str, op: str, wanted: str) -> bool:
    return {"Equal": value == wanted, "NotEqual": value != wanted,
            "Re": re.fullmatch(wanted, value) is not None, "NotRe": re.fullmatch(wanted, value) is None}[op]


def _data_for(families: dict, name: str, matchers) -> tuple[str | None, float, int]:
    """(family type, sum of the matching samples' values, how many) for one selector."""
    kind, total, count = None, 0.0, 0
    for family in families.values():
        for sample in family.samples:
            # prometheus_client's parser names a counter's samples `<name>_total` whatever the text said.
            if sample.name not in (name, f"{name}_total"):
                continue
            if all(_label_matches(sample.labels.get(k, ""), op, v) for k, op, v in matchers):
                kind, total, count = family.type, total + sample.value, count + 1
    return kind, total, count


def dashboard_gaps(text: str, queries: list[tuple[str, str]], counted: tuple[str, ...] = ("counter", "histogram"),
                   skip: tuple[str, ...] = ()) -> list[str]:
    """Each selector of `queries` that finds no data in the exposition `text`, and why. `counted`: the metric
    types that must also have counted something (a quantile of an empty histogram is NaN; a rate of a counter
    still at 0 is 0); `skip`: name prefixes this server does not export (said why by the caller)."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    gaps = []
    for panel, expr in queries:
        for name, matchers in selectors(expr):
            if name.startswith(skip):
                continue
            where = f"{panel}: {name}{matchers}"
            kind, total, count = _data_for(families, name, matchers)
            if not re.search(rf"^{re.escape(name)}[{{ ]", text, re.M):
                gaps.append(f"no sample named exactly {name} ({where})")
            elif not count:
                gaps.append(f"no sample matches {where}")
            elif kind in counted and total <= 0:
                gaps.append(f"nothing counted for {where}")
    return gaps
