"""End to end: a real Prometheus scrapes a running `perception serve` while `perception replay`
drives it; what Prometheus computes (p99 end-to-end latency, per-camera frame rate, frame
counts) must agree with what the replay measured itself."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from tests.observability.grafana_dashboard import iter_exprs, load_dashboard, substitute
from tests.observability.live_processes import (
    PrometheusProcess,
    ServeProcess,
    child_env,
    perception_cmd,
)

pytestmark = pytest.mark.prometheus
log = logging.getLogger(__name__)

CAMERAS = ("front", "rear")
# Configured in the server but silent: must show up at zero and trip the stall alert's condition.
SILENT_CAMERA = "side"
FPS = 20.0  # per camera, replayed at real speed
FRAMES = 120  # per camera: 6 s of drive
SCRAPE_S = 1.0
# Bucket edges of LATENCY_BUCKETS are at most x1.67 apart from 1 ms up: histogram_quantile's
# answer lies in the bucket holding the true quantile, so it can read up to that much above or
# below it (below 1 ms they are up to x2.5 apart; the checks' 1 ms of slack covers those).
BUCKET_SLACK = 1.7


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet: "
                    "the end-to-end test needs `perception serve` and `perception replay`")


def write_drive(root: Path) -> Path:
    """An image-folder drive: one sub-folder of small JPEGs per camera, captured at FPS."""
    rng = np.random.default_rng(0)
    t0 = 1_700_000_000_000_000_000
    for cam_index, cam in enumerate(CAMERAS):
        folder = root / cam
        folder.mkdir(parents=True)
        stamps = []
        for i in range(FRAMES):
            img = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
            cv2.rectangle(img, (20 + i % 60, 30), (70 + i % 60, 90), (0, 0, 255), -1)
            ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
            assert ok
            (folder / f"{i:06d}.jpg").write_bytes(data.tobytes())
            stamps.append(str(t0 + cam_index * 1_000_000 + int(round(i * 1e9 / FPS))))
        (folder / "timestamps.txt").write_text("\n".join(stamps) + "\n")
    return root


@pytest.fixture()
def drive(tmp_path: Path) -> Path:
    return write_drive(tmp_path / "drive")


def test_prometheus_agrees_with_replay(
    tiny_manifest: Path, drive: Path, tmp_path: Path, prometheus_bin: str, deploy_dir: Path
) -> None:
    _needs("server.cli")
    _needs("client.replay_cli")
    work = tmp_path / "work"
    work.mkdir()
    config = tmp_path / "server.yaml"
    config.write_text(json.dumps({"cameras": [*CAMERAS, SILENT_CAMERA]}))  # JSON is YAML
    serve = ServeProcess(tiny_manifest, cwd=work, config=config)
    prom = None
    try:
        rule_files = [deploy_dir / "prometheus" / f for f in ("alerts.yml", "triton_compat.yml")]
        prom = PrometheusProcess(prometheus_bin, tmp_path, [serve.metrics], rule_files, SCRAPE_S)
        prom.wait_for_target_up()
        out, summary_path = tmp_path / "replay.jsonl", tmp_path / "summary.json"
        t_start = time.time()
        replay = subprocess.run(
            perception_cmd("replay", str(drive), "--server", serve.grpc, "--out", str(out),
                           "--json-out", str(summary_path), "--speed", "1"),
            cwd=work, env=child_env(), capture_output=True, text=True, timeout=60,
        )
        t_end = time.time()
        assert replay.returncode == 0, replay.stderr[-3000:]
        time.sleep(2.5 * SCRAPE_S)  # let Prometheus scrape the final counts
        summary = json.loads(summary_path.read_text())
        frames = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        _check_counts(prom, summary, frames)
        _check_latency(prom, summary, t_start, t_end)
        _check_camera_rates(prom, summary, t_start, t_end)
        _check_dashboard_and_rules(prom, deploy_dir)
        _check_stall_condition(prom, deploy_dir)
    finally:
        if prom is not None:
            prom.stop()
        serve.stop()


def _check_counts(prom: PrometheusProcess, summary: dict, frames: list[dict]) -> None:
    assert summary["frames_sent"] == len(CAMERAS) * FRAMES
    assert summary["frames_answered"] == len(frames) > 0
    received = prom.scalar('sum(perception_frames_received_total{job="perception"})')
    answered = prom.scalar('sum(perception_frames_answered_total{job="perception"})')
    dropped = prom.scalar('sum(perception_frames_dropped_total{job="perception"}) or vector(0)')
    ok = sum(1 for f in frames if f["status"] == "OK")
    assert received == summary["frames_sent"]
    assert answered == ok
    assert answered + dropped == summary["frames_answered"]
    # Triton's name for the same count, through deploy/prometheus/triton_compat.yml
    assert prom.scalar('sum(nv_inference_request_success)') == answered
    e2e = prom.scalar('sum(perception_stage_latency_seconds_count{job="perception", stage="end_to_end"})')
    assert ok <= e2e <= summary["frames_answered"]
    batches = prom.scalar('sum(perception_batch_size_frames_sum{job="perception"})')
    assert batches >= ok  # every answered frame went through an inference
    per_camera = {r["metric"]["camera"]: float(r["value"][1]) for r in
                  prom.query('sum by (camera) (perception_frames_received_total{job="perception"})')}
    assert per_camera == {**{cam: float(FRAMES) for cam in CAMERAS}, SILENT_CAMERA: 0.0}


def _check_latency(prom: PrometheusProcess, summary: dict, t_start: float, t_end: float) -> None:
    window = math.ceil(t_end - t_start) + 4
    p99 = prom.scalar(
        'histogram_quantile(0.99, sum by (le) (increase(perception_stage_latency_seconds_bucket'
        f'{{job="perception", stage="end_to_end"}}[{window}s])))'
    )
    client_p99 = summary["latency_ms"]["p99"] / 1000.0
    server_stages = summary["server_stage_ms"]
    assert p99 > 0
    # The server's own clock stops before the reply crosses the wire: at most the round trip.
    assert p99 <= client_p99 * BUCKET_SLACK, (p99, client_p99)
    # and Prometheus reads the same number the server reported in each response's timings
    stage = next((server_stages[k] for k in ("total", "total_us", "end_to_end") if k in server_stages), None)
    assert stage is not None, f"replay summary has no end-to-end server stage: {server_stages}"
    reported = stage["p99"] / 1000.0
    log.info("p99 end to end: prometheus %.2f ms, server-reported %.2f ms, replay round trip %.2f ms",
             p99 * 1e3, reported * 1e3, client_p99 * 1e3)
    assert reported / BUCKET_SLACK - 0.001 <= p99 <= reported * BUCKET_SLACK + 0.001, (p99, reported)
    # per stage, the median and p95 Prometheus computes match the ones the replay computed from
    # the timings in each response (per frame; inference is per batch on the server, so not it)
    for stage_name in ("queue", "preprocess", "postprocess"):
        if stage_name not in server_stages:
            continue
        for q, key in ((0.5, "p50"), (0.95, "p95")):
            got = prom.scalar(
                f'histogram_quantile({q}, sum by (le) (increase(perception_stage_latency_seconds_bucket'
                f'{{job="perception", stage="{stage_name}"}}[{window}s])))'
            )
            want = server_stages[stage_name][key] / 1000.0
            assert want / BUCKET_SLACK - 0.001 <= got <= want * BUCKET_SLACK + 0.001, (stage_name, key, got, want)


def _check_camera_rates(prom: PrometheusProcess, summary: dict, t_start: float, t_end: float) -> None:
    # A window inside the replay, clear of start-up and tail: the steady per-camera rate.
    at = t_end - 0.5
    window = max(2, int(t_end - t_start - 2.0))
    rates = {r["metric"]["camera"]: float(r["value"][1]) for r in prom.query(
        f'sum by (camera) (rate(perception_frames_received_total{{job="perception"}}[{window}s]))', at=at)}
    log.info("per-camera fps: prometheus %s, replay %s", rates, {c: summary["per_camera"][c]["fps"] for c in CAMERAS})
    assert set(rates) == {*CAMERAS, SILENT_CAMERA} and rates[SILENT_CAMERA] == 0, rates
    for cam in CAMERAS:
        replay_fps = summary["per_camera"][cam]["fps"]
        assert replay_fps / 1.5 <= rates[cam] <= replay_fps * 1.5, (cam, rates[cam], replay_fps)
        assert FPS / 1.5 <= rates[cam] <= FPS * 1.5, (cam, rates[cam])


def _check_dashboard_and_rules(prom: PrometheusProcess, deploy_dir: Path) -> None:
    """Every dashboard query runs in this Prometheus, and the core panels have data; every
    alert rule evaluates cleanly against real series."""
    dashboard = load_dashboard(deploy_dir / "grafana" / "dashboards" / "perception.json")
    with_data = 0
    for title, expr in iter_exprs(dashboard):
        result = prom.query(substitute(expr, "30s"))  # raises on a PromQL error
        with_data += bool(result)
        if title in ("Quantiles per stage (p50 / p99)", "Frames received / s per camera", "Batch size", "Served model"):
            assert result, f"panel {title!r} shows nothing: {expr}"
    assert with_data >= 20
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 20
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


def _check_stall_condition(prom: PrometheusProcess, deploy_dir: Path) -> None:
    """The stall alert's condition (its `for:` is minutes, longer than a test) picks out exactly
    the configured camera that never sent, right after the others stopped."""
    rules = yaml.safe_load((deploy_dir / "prometheus" / "alerts.yml").read_text())
    expr = next(r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == "PerceptionCameraStalled")
    stalled = {r["metric"]["camera"] for r in prom.query(expr)}
    assert stalled == {SILENT_CAMERA}
