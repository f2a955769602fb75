"""ServerMetrics: its typed API, label bounds, model / build info, and the HTTP endpoint."""

from __future__ import annotations

import itertools
import math
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from server.gpu_metrics import register_gpu_collector
from server.metrics import LATENCY_BUCKETS, STAGES, ServerMetrics, resolve_build_info, start_metrics_http
from tests.observability.conftest import LiveMetrics, rich_manifest


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def _present(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sample's value; the sample must exist."""
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"no sample {name}{labels}"
    return value


def test_latency_buckets_resolve_100us_to_1s() -> None:
    assert LATENCY_BUCKETS[0] == 0.0001 and 1.0 in LATENCY_BUCKETS
    ratios = [b / a for a, b in itertools.pairwise(LATENCY_BUCKETS) if 0.001 < b <= 1.0]
    assert max(ratios) <= 2.0  # no gap wider than x2 between 1 ms and 1 s
    assert max(b / a for a, b in itertools.pairwise(LATENCY_BUCKETS) if b <= 0.001) <= 2.5  # post-processing, queue


def test_stage_histogram_and_misuse() -> None:
    registry = CollectorRegistry()
    m = ServerMetrics(registry, process=False, gpu=False)
    m.observe_stage("inference", 0.004)
    m.observe_stage("inference", 0.02)
    assert _value(registry, "perception_stage_latency_seconds_count", stage="inference") == 2
    assert _value(registry, "perception_stage_latency_seconds_bucket", stage="inference", le="0.005") == 1
    assert _value(registry, "perception_stage_latency_seconds_sum", stage="inference") == pytest.approx(0.024)
    # every stage exists from the start, so rate() over a stage that never ran is 0, not absent
    for stage in STAGES:
        assert _value(registry, "perception_stage_latency_seconds_count", stage=stage) is not None
    with pytest.raises(ValueError, match="unknown stage"):
        m.observe_stage("nms", 0.001)
    for bad in (-0.001, math.nan, math.inf):
        with pytest.raises(ValueError):
            m.observe_stage("queue", bad)
    with pytest.raises(ValueError, match="unknown drop reason"):
        m.frame_dropped("front", "late")
    with pytest.raises(ValueError):
        m.observe_batch(0)
    with pytest.raises(ValueError):
        m.set_queue_depth(-1)
    with pytest.raises(ValueError):
        m.detections_emitted("car", -1)
    with pytest.raises(ValueError, match="status code"):
        m.grpc_error("Detect", "BROKEN")


def test_camera_label_is_bounded_by_configuration() -> None:
    registry = CollectorRegistry()
    m = ServerMetrics(registry, cameras=["front", "rear"], process=False, gpu=False)
    # configured cameras exist at zero before any frame: a silent camera is visible as stalled
    assert _value(registry, "perception_frames_received_total", camera="rear") == 0
    assert _value(registry, "perception_frames_dropped_total", camera="rear", reason="overloaded") == 0
    # ... and are the cameras the stalled-camera alert watches (first-come ones are not)
    assert _value(registry, "perception_camera_configured", camera="rear") == 1
    first_come = CollectorRegistry()
    ServerMetrics(first_come, cameras=None, process=False, gpu=False).frame_received("replay-7")
    assert first_come.get_sample_value("perception_camera_configured", {"camera": "replay-7"}) is None
    for i in range(50):
        m.frame_received(f"intruder-{i}")  # unbounded ids collapse into one series
    m.frame_received("front")
    m.frame_answered("front")
    m.frame_dropped("intruder-7", "invalid")
    assert _value(registry, "perception_frames_received_total", camera="other") == 50
    assert _value(registry, "perception_frames_received_total", camera="front") == 1
    assert _value(registry, "perception_frames_answered_total", camera="front") == 1
    assert _value(registry, "perception_frames_dropped_total", camera="other", reason="invalid") == 1
    assert _present(registry, "perception_camera_last_frame_timestamp_seconds", camera="front") > 1e9
    assert _value(registry, "perception_camera_last_frame_timestamp_seconds", camera="rear") == 0
    cameras = {s.labels["camera"] for f in registry.collect() if f.name == "perception_frames_received"
               for s in f.samples}
    assert cameras == {"front", "rear", "other"}
    with pytest.raises(ValueError):
        ServerMetrics(CollectorRegistry(), cameras=["other"], process=False, gpu=False)


def test_unconfigured_cameras_keep_their_id() -> None:
    registry = CollectorRegistry()
    m = ServerMetrics(registry, process=False, gpu=False)
    m.frame_received("cam0")
    m.frame_received("")
    assert _value(registry, "perception_frames_received_total", camera="cam0") == 1
    assert _value(registry, "perception_frames_received_total", camera="unnamed") == 1


def test_streams_queue_batch_errors() -> None:
    registry = CollectorRegistry()
    m = ServerMetrics(registry, process=False, gpu=False)
    m.stream_opened()
    m.stream_opened()
    m.stream_closed()
    m.set_queue_depth(5)
    for size in (1, 4, 4):
        m.observe_batch(size)
    m.grpc_error("/perception.v1.Detector/StreamDetect", "RESOURCE_EXHAUSTED")
    m.grpc_error("StreamDetect", "RESOURCE_EXHAUSTED")
    assert _value(registry, "perception_streams_in_flight") == 1
    assert _value(registry, "perception_queue_depth_frames") == 5
    assert _value(registry, "perception_batch_size_frames_count") == 3  # executions
    assert _value(registry, "perception_batch_size_frames_sum") == 9  # inferences
    assert _value(registry, "perception_batch_size_frames_bucket", le="2.0") == 1
    assert _value(registry, "perception_grpc_errors_total", method="StreamDetect", code="RESOURCE_EXHAUSTED") == 2
    with pytest.raises(ValueError, match="distinct methods"):
        for i in range(100):
            m.grpc_error(f"m{i}", "INTERNAL")


def test_model_info_from_manifest(tiny_manifest: Path) -> None:
    registry = CollectorRegistry()
    m = ServerMetrics(registry, process=False, gpu=False)
    manifest = rich_manifest(tiny_manifest)
    m.set_model_info(manifest, "fp32", "onnxruntime-cpu")
    info = {
        "model": manifest.name, "version": manifest.version, "variant": "fp32", "precision": "fp32",
        "backend": "onnxruntime-cpu", "format": "onnx", "input_size": "64x48",
    }
    assert _value(registry, "perception_model_info", **info) == 1
    assert _value(registry, "perception_model_macs") == 1_234_567
    assert _value(registry, "perception_model_parameters") == 8_901
    assert _value(registry, "perception_model_input_pixels", dimension="width") == 64
    assert _value(registry, "perception_model_input_pixels", dimension="height") == 48
    assert _value(registry, "perception_model_kpi_ratio", metric="map50_95") == pytest.approx(0.412)
    assert _value(registry, "perception_model_build_latency_seconds", statistic="p99") == pytest.approx(0.00725)
    assert _value(registry, "perception_model_classes") == 7
    # classes are bounded by the manifest once it is known, and all exist at zero
    assert _value(registry, "perception_detections_total", class_name="traffic_sign") == 0
    m.detections_emitted("pedestrian", 4)
    m.detections_emitted("pedestrian", 0)
    assert _value(registry, "perception_detections_total", class_name="pedestrian") == 4
    with pytest.raises(ValueError, match="not a class"):
        m.detections_emitted("unicorn", 1)
    # a reload replaces the info series instead of adding a second one
    m.set_model_info(manifest, "fp32", "tensorrt")
    infos = [s for f in registry.collect() if f.name == "perception_model_info" for s in f.samples]
    assert [s.labels["backend"] for s in infos] == ["tensorrt"]


def test_build_info(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERCEPTION_GIT_SHA", "0123abc")
    registry = CollectorRegistry()
    ServerMetrics(registry, process=False, gpu=False)
    info = resolve_build_info()
    assert info.git_sha == "0123abc" and info.version not in ("", "unknown")
    assert _value(registry, "perception_build_info", version=info.version, git_sha="0123abc") == 1


def test_build_info_from_the_installed_package(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """An install made from a copy without .git (deploy/vehicle/install.sh) records its commit in
    the package; the image's ENV default "unknown" does not hide it."""
    import server.metrics as metrics_module

    recorded = tmp_path / "build_info.json"
    recorded.write_text('{"git_sha": "feedbeef"}\n')
    monkeypatch.setattr(metrics_module, "BUILD_INFO_FILE", recorded)
    for env in (None, "unknown", ""):
        if env is None:
            monkeypatch.delenv("PERCEPTION_GIT_SHA", raising=False)
        else:
            monkeypatch.setenv("PERCEPTION_GIT_SHA", env)
        assert resolve_build_info().git_sha == "feedbeef"
    monkeypatch.setenv("PERCEPTION_GIT_SHA", "0123abc")  # the environment still wins
    assert resolve_build_info().git_sha == "0123abc"


def test_process_metrics_are_exported() -> None:
    registry = CollectorRegistry()
    ServerMetrics(registry, gpu=False)
    assert _present(registry, "process_resident_memory_bytes") > 1e6
    assert _present(registry, "process_cpu_seconds_total") > 0
    assert _present(registry, "perception_process_threads") >= 1
    assert 0.0 <= _present(registry, "perception_host_cpu_utilization_ratio") <= 1.0
    used = _present(registry, "perception_host_memory_used_bytes")
    assert used < _present(registry, "perception_host_memory_total_bytes")


def test_gpu_metrics_skip_cleanly_without_a_gpu() -> None:
    try:
        import pynvml  # noqa: F401
    except ImportError:
        registry = CollectorRegistry()
        assert register_gpu_collector(registry) is False
        assert not [f for f in registry.collect() if f.name.startswith("perception_gpu")]
    else:
        pytest.skip("pynvml is installed; this test is about hosts without it")


def test_http_endpoint_serves_the_registry(live_metrics: LiveMetrics) -> None:
    text = live_metrics.scrape()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    e2e = [s for s in families["perception_stage_latency_seconds"].samples
           if s.name.endswith("_count") and s.labels["stage"] == "end_to_end"]
    assert e2e[0].value == 1
    assert "perception_model_macs" in families
    assert "process_resident_memory_bytes" in families


def test_start_metrics_http_picks_a_free_port_and_stops() -> None:
    registry = CollectorRegistry()
    ServerMetrics(registry, process=False, gpu=False)
    server, port = start_metrics_http(registry, 0, host="127.0.0.1")
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert b"perception_build_info" in r.read()
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with pytest.raises(ValueError):
        start_metrics_http(registry, 70000)


@pytest.mark.gpu
def test_gpu_metrics_on_a_gpu_host() -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            raise RuntimeError("no device")
    except Exception as exc:  # ImportError, NVMLError, no device: not a GPU host
        pytest.skip(f"needs an NVIDIA GPU and pynvml (pip install nvidia-ml-py): {exc}")
    registry = CollectorRegistry()
    assert register_gpu_collector(registry) is True
    utils = [s.value for f in registry.collect() if f.name == "perception_gpu_utilization_ratio" for s in f.samples]
    assert utils and all(0.0 <= v <= 1.0 for v in utils)
    total = [s.value for f in registry.collect() if f.name == "perception_gpu_memory_total_bytes" for s in f.samples]
    assert total and all(v > 0 for v in total)
