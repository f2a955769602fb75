"""The Prometheus adapter queries behind the HPA, run for real through `promtool test rules`:
each rule's metricsQuery is rendered as the adapter renders it for a list of pods, then
evaluated on pods with traffic, a pod whose traffic stopped and a pod that never had any.
Every pod must get a number, and an idle pod 0 (not NaN, not missing), so that an idle
Deployment can scale down."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.cli_check import REPO_ROOT

pytestmark = pytest.mark.prometheus

RULES = REPO_ROOT / "deploy" / "k8s" / "prometheus-adapter-rules.yaml"
HPA = REPO_ROOT / "deploy" / "k8s" / "hpa.yaml"
NAMESPACE = "perception"
# busy: 30 frames/s all the time; cooled: the same until minute 5, nothing after; idle: nothing.
PODS = ("busy", "cooled", "idle")
# The latency rule before it handled idle pods, to show the check below can fail.
NAN_PRONE_LATENCY = (
    'histogram_quantile(0.95, sum by (<<.GroupBy>>, le) '
    '(rate(<<.Series>>{<<.LabelMatchers>>,stage="end_to_end"}[2m])))'
)


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH; install it with `apt-get install prometheus` (scripts/test_services.sh)")
    return path


def adapter_rules() -> dict[str, dict]:
    config = yaml.safe_load(yaml.safe_load(RULES.read_text())["data"]["config.yaml"])
    return {rule["name"]["as"]: rule for rule in config["rules"]}


def render(metrics_query: str, series: str) -> str:
    """The query the adapter sends when the HPA asks for the metric of every pod in PODS
    (prometheus-adapter's query builder: the namespace and pod matchers joined with commas,
    several pods as one regex, GroupBy = the pod label)."""
    query = (
        metrics_query.replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{"|".join(PODS)}"')
        .replace("<<.GroupBy>>", "pod")
    )
    assert "<<" not in query, f"template field the test does not render: {query}"
    return query


def _series(name: str, pod: str, values: str, **labels: str) -> dict:
    text = ", ".join(f'{k}="{v}"' for k, v in {"namespace": NAMESPACE, "pod": pod, **labels}.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def input_series() -> list[dict]:
    answered = {"busy": "0+1800x15", "cooled": "0+1800x5 9000x10", "idle": "0x15"}
    queued = {"busy": "6x15", "cooled": "6x5 0x10", "idle": "0x15"}
    series = []
    for pod in PODS:
        # every frame in 10..50 ms: p95 = 10 ms + 0.95 x 40 ms = 48 ms
        series.append(_series("perception_stage_latency_seconds_bucket", pod, "0x15", stage="end_to_end", le="0.01"))
        for le in ("0.05", "+Inf"):
            series.append(
                _series("perception_stage_latency_seconds_bucket", pod, answered[pod], stage="end_to_end", le=le)
            )
        # another stage's traffic must not count as end-to-end
        series.append(_series("perception_stage_latency_seconds_bucket", pod, "0+900x15", stage="queue", le="+Inf"))
        series.append(_series("perception_queue_depth_frames", pod, queued[pod]))
    return series


def promtool_test(queries: dict[str, str], expected: dict[str, dict[int, dict[str, float]]]) -> dict:
    """A promtool unit test of `queries` (metric -> PromQL) against input_series():
    expected[metric][minute][pod] = value."""
    checks = [
        {
            "expr": queries[metric],
            "eval_time": f"{minute}m",
            "exp_samples": [{"labels": RESULT_LABELS[metric].format(pod=pod), "value": value}
                            for pod, value in by_pod.items()],
        }
        for metric, by_minute in expected.items()
        for minute, by_pod in by_minute.items()
    ]
    return {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input_series(), "promql_expr_test": checks}],
    }


def run_promtool(promtool: str, test: dict, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "adapter_test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    return subprocess.run([promtool, "test", "rules", "adapter_test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


# Labels of each query's result (the adapter needs the pod label to match values to pods).
RESULT_LABELS = {
    "perception_end_to_end_latency_p95_seconds": '{{pod="{pod}"}}',
    "perception_queue_depth_frames": '{{namespace="perception", pod="{pod}"}}',
}
EXPECTED: dict[str, dict[int, dict[str, float]]] = {
    "perception_end_to_end_latency_p95_seconds": {
        4: {"busy": 0.048, "cooled": 0.048, "idle": 0},
        10: {"busy": 0.048, "cooled": 0, "idle": 0},
    },
    "perception_queue_depth_frames": {
        4: {"busy": 6, "cooled": 6, "idle": 0},
        10: {"busy": 6, "cooled": 0, "idle": 0},
    },
}


def test_hpa_scales_on_average_values_of_the_adapter_metrics() -> None:
    # With AverageValue the HPA wants ceil(sum over pods / target) replicas: a pod that reports
    # 0 adds no load, so idle pods let it scale down; a pod with no value at all is assumed to be
    # at target when scaling down, which is why no pod may be left without one.
    hpa = yaml.safe_load(HPA.read_text())
    served = adapter_rules()
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"]["type"] for m in hpa["spec"]["metrics"]}
    assert targets == dict.fromkeys(EXPECTED, "AverageValue")
    assert set(targets) <= set(served)


def test_every_pod_gets_a_number_and_an_idle_pod_zero(promtool: str, tmp_path: Path) -> None:
    rules = adapter_rules()
    queries = {
        metric: render(rules[metric]["metricsQuery"], rules[metric]["seriesQuery"].split("{")[0].strip("'\" "))
        for metric in EXPECTED
    }
    result = run_promtool(promtool, promtool_test(queries, EXPECTED), tmp_path)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_the_check_catches_a_nan_for_an_idle_pod(promtool: str, tmp_path: Path) -> None:
    # the test above can fail: the bare histogram_quantile gives NaN for the pods without traffic
    query = render(NAN_PRONE_LATENCY, "perception_stage_latency_seconds_bucket")
    metric = "perception_end_to_end_latency_p95_seconds"
    result = run_promtool(promtool, promtool_test({metric: query}, {metric: EXPECTED[metric]}), tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert '{pod="idle"} NaN' in result.stdout + result.stderr, result.stdout + result.stderr
