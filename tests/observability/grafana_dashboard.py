"""Reading the shipped Grafana dashboard (test helper): its panels and PromQL expressions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# What Grafana substitutes for its variables, for running an expression in plain Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$camera": ".*", "${datasource}": ""}


def load_dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels nested in collapsed rows


def iter_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def substitute(expr: str, rate_interval: str = "1m") -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, rate_interval if var == "$__rate_interval" else value)
    return expr
