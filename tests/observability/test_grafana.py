"""The shipped Grafana dashboard: well-formed, complete, and every expression refers to metrics
a real metrics endpoint of the server exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.observability.conftest import LiveMetrics
from tests.observability.grafana_dashboard import iter_exprs, iter_panels, load_dashboard
from tests.observability.promql_names import GPU_ONLY, PROMETHEUS_SYNTHETIC, exposed_names, metric_names


@pytest.fixture(scope="module")
def dashboard(deploy_dir: Path) -> dict:
    return load_dashboard(deploy_dir / "grafana" / "dashboards" / "perception.json")


def test_dashboard_is_well_formed(dashboard: dict) -> None:
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in iter_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in iter_panels(dashboard):
        if panel["type"] == "row":
            continue
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance", "camera"} <= variables


def test_dashboard_shows_what_on_call_needs(dashboard: dict) -> None:
    exprs = [e for _, e in iter_exprs(dashboard)]
    types = {p["type"] for p in iter_panels(dashboard)}
    assert "heatmap" in types
    joined = "\n".join(exprs)
    for needle in (
        'histogram_quantile(0.99, sum by (le, stage)',  # quantiles per stage
        "perception_frames_received_total",  # per-camera fps
        "perception_frames_dropped_total",  # drops
        "perception_batch_size_frames",  # batch size
        "perception_model_info", "perception_model_macs", "perception_model_kpi_ratio",  # model info
    ):
        assert needle in joined, needle
    heatmaps = [p for p in iter_panels(dashboard) if p["type"] == "heatmap"]
    assert all(t.get("format") == "heatmap" and "_bucket" in t["expr"] for p in heatmaps for t in p["targets"])


def test_every_expression_uses_exported_metrics(dashboard: dict, live_metrics: LiveMetrics) -> None:
    exported = exposed_names(live_metrics.scrape()) | PROMETHEUS_SYNTHETIC | GPU_ONLY
    seen: set[str] = set()
    for title, expr in iter_exprs(dashboard):
        names = metric_names(expr)
        assert names, f"panel {title!r}: no metric found in {expr!r}"
        assert names <= exported, f"panel {title!r} uses metrics the server does not export: {names - exported}"
        seen |= names
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            names = metric_names(var["definition"].replace("label_values(", "(").split(",")[0] + ")")
            assert names <= exported, f"variable {var['name']}: {names - exported}"
    # and the dashboard charts most of what the server exports, not a stale subset
    perception_exported = {n for n in exported if n.startswith("perception_") and not n.endswith("_created")}
    assert len(seen & perception_exported) >= 0.6 * len(perception_exported)


def test_provisioning_files_are_valid(deploy_dir: Path) -> None:
    prov = deploy_dir / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    boards = yaml.safe_load((prov / "dashboards" / "perception.yml").read_text())
    provider = boards["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]
