"""The committed dashboard and alert rules, read as data: every PromQL expression and every
metric name they use."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "dashboards/grafana/dashboards/token-ledger.json"
PROMETHEUS = REPO / "dashboards/prometheus"
METRIC = re.compile(r"\b(token_ledger_[a-z_]+)\b")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_expressions() -> dict[str, str]:
    """'panel title / refId' -> PromQL, as Grafana stores it (with $job, $__rate_interval)."""
    return {
        f"{panel['title']} / {target['refId']}": target["expr"]
        for panel in dashboard()["panels"]
        for target in panel["targets"]
    }


def alert_expressions() -> dict[str, str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def to_promql(expr: str, job: str = "token-ledger") -> str:
    """Grafana's variables replaced the way Grafana would for a short window."""
    return expr.replace("$__rate_interval", "1m").replace("$__range", "10m").replace("$job", job)


def referenced_metrics() -> set[str]:
    texts = [*dashboard_expressions().values(), *alert_expressions().values()]
    return {name for text in texts for name in METRIC.findall(text)}


def exposed_sample_names(exposition: str) -> set[str]:
    """Every sample name /metrics can carry, from its # TYPE lines (present even before the
    first observation of a labelled metric)."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
    return names
