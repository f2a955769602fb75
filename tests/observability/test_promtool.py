"""promtool on what ships: a real scrape is lint-clean, the config and rules are valid, the rule
unit tests pass, and every rule refers to a metric the server really exports."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.observability.conftest import LiveMetrics
from tests.observability.promql_names import GPU_ONLY, PROMETHEUS_SYNTHETIC, exposed_names, metric_names

pytestmark = pytest.mark.prometheus
RULE_FILES = ("alerts.yml", "triton_compat.yml")


def _run(cmd: list[str], stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd)


def test_promtool_check_metrics_is_clean_on_a_real_scrape(promtool: str, live_metrics: LiveMetrics) -> None:
    text = live_metrics.scrape()
    result = _run([promtool, "check", "metrics"], stdin=text)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


def test_promtool_flags_a_bad_exposition(promtool: str) -> None:
    # the check above can fail: promtool does lint what we feed it
    bad = "# HELP requests Requests.\n# TYPE requests counter\nrequests 1\n"
    result = _run([promtool, "check", "metrics"], stdin=bad)
    assert result.returncode != 0 and "_total" in (result.stdout + result.stderr)


def test_scrape_config_is_valid(promtool: str, deploy_dir: Path) -> None:
    result = _run([promtool, "check", "config", str(deploy_dir / "prometheus" / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_files_are_valid(promtool: str, deploy_dir: Path) -> None:
    result = _run([promtool, "check", "rules", *(str(deploy_dir / "prometheus" / f) for f in RULE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass(promtool: str, deploy_dir: Path) -> None:
    rules_dir = deploy_dir / "prometheus"
    tests = sorted(p.relative_to(rules_dir).as_posix() for p in rules_dir.glob("tests/*_test.yml"))
    assert tests == ["tests/alerts_test.yml", "tests/triton_compat_test.yml"]
    result = _run([promtool, "test", "rules", *tests], cwd=deploy_dir / "prometheus")
    assert result.returncode == 0 and result.stdout.count("SUCCESS") == len(tests), result.stdout + result.stderr


def test_a_broken_rule_fails_its_unit_test(promtool: str, deploy_dir: Path, tmp_path: Path) -> None:
    # the unit tests can fail: loosen the latency budget tenfold and they must notice
    src = deploy_dir / "prometheus"
    (tmp_path / "alerts.yml").write_text((src / "alerts.yml").read_text().replace(") > 0.05", ") > 0.5"))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "alerts_test.yml").write_text((src / "tests" / "alerts_test.yml").read_text())
    result = _run([promtool, "test", "rules", "tests/alerts_test.yml"], cwd=tmp_path)
    assert result.returncode != 0 and "PerceptionEndToEndLatencyHigh" in result.stdout + result.stderr


def test_required_alerts_exist(deploy_dir: Path) -> None:
    rules = yaml.safe_load((deploy_dir / "prometheus" / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {
        "PerceptionServerDown", "PerceptionEndToEndLatencyHigh", "PerceptionDropRateHigh", "PerceptionCameraStalled",
    } <= names


def test_rules_refer_to_exported_metrics(deploy_dir: Path, live_metrics: LiveMetrics) -> None:
    exported = exposed_names(live_metrics.scrape()) | PROMETHEUS_SYNTHETIC | GPU_ONLY
    for rule_file in RULE_FILES:
        rules = yaml.safe_load((deploy_dir / "prometheus" / rule_file).read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule.get("record")
                names = metric_names(rule["expr"])
                assert names, f"{name}: found no metric in {rule['expr']!r}"
                assert names <= exported, f"{name} uses metrics the server does not export: {names - exported}"


def test_scrape_config_loads_every_rule_file(deploy_dir: Path) -> None:
    config = yaml.safe_load((deploy_dir / "prometheus" / "prometheus.yml").read_text())
    loaded = {p.name for pattern in config["rule_files"] for p in (deploy_dir / "prometheus").glob(pattern)}
    assert loaded == set(RULE_FILES)
    assert any(job["job_name"] == "perception" for job in config["scrape_configs"])


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, camera) (rate(perception_stage_latency_seconds_bucket'
        '{stage="end_to_end", camera=~"$camera"}[$__rate_interval]))) > 0.05 '
        'and on (instance) up == 1 or absent(perception_model_info offset 5m)'
    )
    assert metric_names(expr) == {"perception_stage_latency_seconds_bucket", "up", "perception_model_info"}
