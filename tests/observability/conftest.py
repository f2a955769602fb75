"""Fixtures for the observability tests: the Prometheus binaries and a live metrics endpoint."""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from perception.manifest import Manifest, load_manifest
from server.metrics import DROP_REASONS, STAGES, ServerMetrics, start_metrics_http

INSTALL_HINT = "install it with `apt-get install prometheus` (Debian/Ubuntu: provides prometheus and promtool)"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not on PATH; {INSTALL_HINT}")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _binary("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return _binary("prometheus")


@pytest.fixture(scope="session")
def deploy_dir() -> Path:
    return DEPLOY


def rich_manifest(tiny_manifest: Path) -> Manifest:
    """The tiny artifact's manifest with build-time facts filled in, as a real build writes them."""
    manifest = load_manifest(tiny_manifest)
    variant = replace(
        manifest.variant(),
        macs=1_234_567,
        params=8_901,
        metrics={"map50_95": 0.412, "map50": 0.655, "precision": 0.7, "recall": 0.61},
        latency_ms={"p50": 3.5, "p99": 7.25},
    )
    return replace(manifest, variants=(variant,))


@dataclass
class LiveMetrics:
    metrics: ServerMetrics
    manifest: Manifest
    url: str

    def scrape(self) -> str:
        with urllib.request.urlopen(self.url, timeout=5) as response:
            return response.read().decode()


@pytest.fixture()
def live_metrics(tiny_manifest: Path) -> Iterator[LiveMetrics]:
    """A ServerMetrics on its own registry, served on a free loopback port, with every
    metric family touched once (so a scrape shows every series the server can export)."""
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry, cameras=["front", "rear"])
    manifest = rich_manifest(tiny_manifest)
    metrics.set_model_info(manifest, manifest.default_variant, "onnxruntime-cpu")
    for i, stage in enumerate(STAGES):
        metrics.observe_stage(stage, 0.001 * (i + 1))
    metrics.frame_received("front")
    metrics.frame_answered("front")
    for reason in DROP_REASONS:
        metrics.frame_dropped("rear", reason)
    metrics.detections_emitted("car", 3)
    metrics.grpc_error("/perception.v1.Detector/Detect", "INVALID_ARGUMENT")
    metrics.stream_opened()
    metrics.set_queue_depth(2)
    metrics.observe_batch(4)
    server, port = start_metrics_http(registry, 0, host="127.0.0.1")
    try:
        yield LiveMetrics(metrics, manifest, f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
