"""Prometheus metrics of the server, built on an injected registry.

Names follow ``perception_<what>_<unit>``; labels are bounded (stage, configured camera ids,
drop reason, class name from the manifest, gRPC method and status code) and never a frame id.
The servicer and the scheduler call the small methods below; nothing else in the server touches
prometheus_client. Every metric is documented in docs/metrics.md, with its Triton equivalent.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from perception.manifest import Manifest
from server.gpu_metrics import register_gpu_collector
from server.process_metrics import register_process_collectors

logger = logging.getLogger(__name__)

# 100 us .. 1 s, at most x2.5 apart below 1 ms and x1.67 above (plus 2.5 s to see a stall):
# resolves the budget of a 30 fps camera (33 ms) finely; histogram_quantile's answer lies in
# the bucket of the true quantile, so within that factor of it (the end-to-end test checks this
# against a replay). The buckets under 1 ms are for the stages that take that little: 58 of 60
# postprocess and all 60 queue times of the shipped model fell in the first bucket when it was
# 1 ms, and every quantile of them read as an interpolated 0.5 ms.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
)
# Batches are formed across cameras; a vehicle has at most a few dozen.
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
STAGES = ("queue", "preprocess", "inference", "postprocess", "end_to_end")
# "error": the model failed on the frame (the client is told OVERLOADED: send the next one); it
# used to be counted "overloaded", so a broken runtime looked like load shedding.
DROP_REASONS = ("stale", "expired", "invalid", "overloaded", "error", "cancelled")
# The canonical gRPC status code names (grpc.StatusCode.<X>.name); a fixed, bounded set.
GRPC_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)
OTHER_CAMERA = "other"
UNNAMED_CAMERA = "unnamed"
# gRPC methods are a handful per service; more distinct values than this means a caller is
# passing something unbounded (a peer, a request id) as the method.
MAX_METHODS = 32


LIFECYCLE_EVENTS = ("swap", "refused", "rollback", "degrade", "recover")
PRIORITY_NAMES = {0: "best_effort", 1: "normal", 2: "critical"}  # server.config.PRIORITY_CLASSES

class ServerMetrics:
    """Every metric the server exports, on ``registry``.

    ``cameras`` bounds the camera label's values: frames from a camera not in the set are
    counted under ``"other"`` (None = accept any id, for tests and single-camera setups only).
    Configured cameras get their series created at zero, so a camera that never sends shows
    up as stalled instead of missing. ``process`` / ``gpu`` register the process (CPU, memory)
    and GPU (NVML, only where a GPU and pynvml exist) collectors on the same registry.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        cameras: Iterable[str] | None = None,
        *,
        process: bool = True,
        gpu: bool = True,
    ) -> None:
        self.registry = registry
        self._cameras = frozenset(cameras) if cameras is not None else None
        if self._cameras is not None and (OTHER_CAMERA in self._cameras or "" in self._cameras):
            raise ValueError(f"camera ids must be non-empty and not {OTHER_CAMERA!r}")
        self._classes: frozenset[str] | None = None
        self._methods: set[str] = set()

        self.stage_latency = Histogram(
            "perception_stage_latency_seconds",
            "Wall-clock time spent in each pipeline stage: per frame, except inference, per batch run "
            "(end_to_end: from receipt of the request to the response being handed to gRPC).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.priority_latency = Histogram(
            "perception_priority_latency_seconds",
            "End-to-end time of OK frames per camera priority class (--camera-priorities).",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        for name in PRIORITY_NAMES.values():
            self.priority_latency.labels(name)
        self.frames_received = Counter(
            "perception_frames_received", "Frames received, per camera.", ["camera"], registry=registry
        )
        self.frames_answered = Counter(
            "perception_frames_answered", "Frames answered OK (with or without detections), per camera.", ["camera"],
            registry=registry
        )
        self.frames_dropped = Counter(
            "perception_frames_dropped",
            "Frames answered without detections, per camera and reason.",
            ["camera", "reason"],
            registry=registry,
        )
        self.last_frame = Gauge(
            "perception_camera_last_frame_timestamp_seconds",
            "Unix time the last frame of each camera was received (0 = never).",
            ["camera"],
            registry=registry,
        )
        self.camera_configured = Gauge(
            "perception_camera_configured",
            "1 for each camera the server was configured with (--cameras / --metric-cameras): a camera "
            "expected to send. Cameras named first-come are not here: one that stops may have moved or ended.",
            ["camera"],
            registry=registry,
        )
        self.detections = Counter(
            "perception_detections", "Detections returned, per class.", ["class_name"], registry=registry
        )
        self.grpc_errors = Counter(
            "perception_grpc_errors",
            "RPCs (or stream messages) that ended in a non-OK gRPC status, per method and code.",
            ["method", "code"],
            registry=registry,
        )
        self.streams_in_flight = Gauge(
            "perception_streams_in_flight", "Open streams (StreamDetect, and KServe ModelStreamInfer).",
            registry=registry
        )
        self.queue_depth = Gauge(
            "perception_queue_depth_frames", "Frames waiting for a batch slot.", registry=registry
        )
        self.batch_size = Histogram(
            "perception_batch_size_frames",
            "Frames per inference execution (_count = executions, _sum = inferences).",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.model_info = Gauge(
            "perception_model_info",
            "The served model (value is always 1): name, version, variant, precision, backend, format, input size.",
            ["model", "version", "variant", "precision", "backend", "format", "input_size"],
            registry=registry,
        )
        self.model_macs = Gauge(
            "perception_model_macs", "Multiply-accumulates per frame of the served variant (from the manifest).",
            registry=registry,
        )
        self.model_params = Gauge(
            "perception_model_parameters", "Parameters of the served variant (from the manifest).", registry=registry
        )
        self.model_input = Gauge(
            "perception_model_input_pixels", "Model input size in pixels, per dimension.", ["dimension"],
            registry=registry,
        )
        self.lifecycle_events = Counter(
            "perception_model_lifecycle_events",
            "Model lifecycle steps: swap, refused, rollback, degrade (to a faster variant), recover.",
            ["event"], registry=registry,
        )
        for event in LIFECYCLE_EVENTS:
            self.lifecycle_events.labels(event)
        self.model_degraded = Gauge(
            "perception_model_degraded",
            "1 while graceful degradation serves a faster variant than the configured one.", registry=registry,
        )
        self.model_max_batch = Gauge(
            "perception_model_max_batch_frames", "Largest batch the served variant accepts.", registry=registry
        )
        self.model_classes = Gauge(
            "perception_model_classes", "Number of classes the served model detects.", registry=registry
        )
        self.model_kpi = Gauge(
            "perception_model_kpi_ratio",
            "Build-time accuracy of the served variant on its validation set (0..1), per KPI "
            "(map50_95, map50, precision, recall, ...).",
            ["metric"],
            registry=registry,
        )
        self.model_build_latency = Gauge(
            "perception_model_build_latency_seconds",
            "Latency measured for the served variant at build time, per statistic.",
            ["statistic"],
            registry=registry,
        )
        self.model_loaded = Gauge(
            "perception_model_loaded_timestamp_seconds", "Unix time the served model was loaded.", registry=registry
        )
        self.build_info = Gauge(
            "perception_build_info", "The server build (value is always 1).", ["version", "git_sha"], registry=registry
        )
        info = resolve_build_info()
        self.build_info.labels(info.version, info.git_sha).set(1)

        for stage in STAGES:
            self.stage_latency.labels(stage)
        for camera in sorted(self._cameras or ()):
            self.frames_received.labels(camera)
            self.frames_answered.labels(camera)
            self.last_frame.labels(camera)
            self.camera_configured.labels(camera).set(1)
            for reason in DROP_REASONS:
                self.frames_dropped.labels(camera, reason)
        if process:
            register_process_collectors(registry)
        self.gpu_enabled = register_gpu_collector(registry) if gpu else False

    # -- labels -------------------------------------------------------------------------------

    def camera_label(self, camera_id: str) -> str:
        """The label value a camera id is counted under: itself if configured, else "other"."""
        if self._cameras is None:
            return camera_id or UNNAMED_CAMERA
        return camera_id if camera_id in self._cameras else OTHER_CAMERA

    # -- per frame ----------------------------------------------------------------------------

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record ``seconds`` (wall clock, >= 0) spent by one frame in ``stage`` (one of STAGES)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")
        if not seconds >= 0.0 or math.isinf(seconds):  # also rejects NaN
            raise ValueError(f"stage duration must be a finite number >= 0 seconds, got {seconds!r}")
        self.stage_latency.labels(stage).observe(seconds)

    def observe_priority(self, priority: int, seconds: float) -> None:
        """An OK frame's end-to-end time, under its camera's priority class."""
        self.priority_latency.labels(PRIORITY_NAMES.get(priority, "normal")).observe(max(0.0, seconds))

    def frame_received(self, camera_id: str) -> None:
        label = self.camera_label(camera_id)
        self.frames_received.labels(label).inc()
        self.last_frame.labels(label).set(time.time())

    def frame_answered(self, camera_id: str) -> None:
        self.frames_answered.labels(self.camera_label(camera_id)).inc()

    def frame_dropped(self, camera_id: str, reason: str) -> None:
        """Count a frame answered without detections, or left unanswered by the end of its stream
        ("cancelled"); ``reason`` is one of DROP_REASONS."""
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; known: {DROP_REASONS}")
        self.frames_dropped.labels(self.camera_label(camera_id), reason).inc()

    def detections_emitted(self, class_name: str, count: int) -> None:
        """Count ``count`` (>= 0) detections of ``class_name`` (a class of the served model)."""
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"detection count must be an int >= 0, got {count!r}")
        if self._classes is not None and class_name not in self._classes:
            raise ValueError(f"class {class_name!r} is not a class of the served model")
        if count:
            self.detections.labels(class_name).inc(int(count))

    # -- server state -------------------------------------------------------------------------

    def grpc_error(self, method: str, code_name: str) -> None:
        """Count an RPC that ended with status ``code_name`` (e.g. "INVALID_ARGUMENT")."""
        if code_name not in GRPC_CODES:
            raise ValueError(f"unknown gRPC status code name {code_name!r}")
        if not method:
            raise ValueError("method must be a non-empty RPC name")
        method = method.rsplit("/", 1)[-1]  # "/perception.v1.Detector/Detect" -> "Detect"
        if method not in self._methods:
            if len(self._methods) >= MAX_METHODS:
                raise ValueError(f"more than {MAX_METHODS} distinct methods: is {method!r} really an RPC name?")
            self._methods.add(method)
        self.grpc_errors.labels(method, code_name).inc()

    def lifecycle_event(self, event: str) -> None:
        if event not in LIFECYCLE_EVENTS:
            raise ValueError(f"unknown lifecycle event {event!r}; known: {LIFECYCLE_EVENTS}")
        self.lifecycle_events.labels(event).inc()

    def set_degraded(self, degraded: bool) -> None:
        self.model_degraded.set(1 if degraded else 0)

    def stream_opened(self) -> None:
        self.streams_in_flight.inc()

    def stream_closed(self) -> None:
        self.streams_in_flight.dec()

    def set_queue_depth(self, n: int) -> None:
        """Frames currently queued (>= 0)."""
        if n < 0:
            raise ValueError(f"queue depth must be >= 0, got {n}")
        self.queue_depth.set(n)

    def observe_batch(self, size: int) -> None:
        """Record one inference execution over ``size`` (>= 1) frames."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        self.batch_size.observe(size)

    def set_model_info(self, manifest: Manifest, variant_name: str, backend_name: str,
                       loaded_at: float | None = None) -> None:
        """Export the served variant's facts from the manifest: MACs, params, precision, backend,
        input size, build-time KPI and latency. Replaces what a previous call exported.
        loaded_at: when the model was loaded (Unix seconds; now if not given): a rollback serves
        a model loaded long before, and its load time is that one's."""
        variant = manifest.variant(variant_name)
        pre = manifest.preprocess
        for gauge in (self.model_info, self.model_kpi, self.model_build_latency):
            gauge.clear()
        self.model_info.labels(
            manifest.name, manifest.version, variant.name, variant.precision, backend_name, variant.format,
            f"{pre.input_width}x{pre.input_height}",
        ).set(1)
        self.model_macs.set(variant.macs)
        self.model_params.set(variant.params)
        self.model_input.labels("width").set(pre.input_width)
        self.model_input.labels("height").set(pre.input_height)
        self.model_max_batch.set(variant.max_batch)
        self.model_classes.set(manifest.num_classes)
        for key, value in sorted(variant.metrics.items()):
            if _is_number(value):
                self.model_kpi.labels(key).set(float(value))
        for key, value in sorted(variant.latency_ms.items()):
            if _is_number(value):
                self.model_build_latency.labels(key).set(float(value) / 1000.0)
        self.model_loaded.set(time.time() if loaded_at is None else loaded_at)
        # Every model this server has served: frames of the previous model can still be answered
        # after a swap to one with other classes, and their labels stay as bounded as the loads.
        self._classes = (self._classes or frozenset()) | frozenset(manifest.classes)
        for name in manifest.classes:
            self.detections.labels(name)


@dataclass(frozen=True)
class BuildInfo:
    version: str
    git_sha: str


# Written into the installed package by deploy/vehicle/install.sh (``{"git_sha": ...}``): an
# install is built from a copy of the sources without .git.
BUILD_INFO_FILE = Path(__file__).with_name("build_info.json")


def resolve_build_info() -> BuildInfo:
    """The installed package version and the git commit it was built from.

    The sha comes from ``PERCEPTION_GIT_SHA`` (set by the image build, ``--build-arg GIT_SHA``,
    where no .git exists), else from ``server/build_info.json`` (written by
    deploy/vehicle/install.sh when it installs from a git checkout), else from the source
    checkout's .git, else "unknown". Reads files only; runs no git.
    """
    try:
        version = metadata.version("perception")
    except metadata.PackageNotFoundError:
        version = "unknown"
    sha = os.environ.get("PERCEPTION_GIT_SHA", "").strip()
    if sha in ("", "unknown"):
        sha = _packaged_sha(BUILD_INFO_FILE) or _git_sha(Path(__file__).resolve().parents[1])
    return BuildInfo(version=version, git_sha=sha)


def _packaged_sha(path: Path) -> str:
    """The ``git_sha`` recorded in ``path`` at install time; '' when there is none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    sha = data.get("git_sha") if isinstance(data, dict) else None
    return sha.strip()[:40] if isinstance(sha, str) else ""


def _git_sha(root: Path) -> str:
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:40] or "unknown"
        ref = head[5:]
        ref_file = git / ref
        if ref_file.is_file():
            return ref_file.read_text().strip()[:40]
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0][:40]
    except OSError:
        pass
    return "unknown"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def start_metrics_http(
    registry: CollectorRegistry, port: int, host: str = "0.0.0.0"
) -> tuple[WSGIServer, int]:
    """Serve ``registry`` at http://host:port/metrics on a daemon thread.

    ``port`` 0 picks a free port. Returns ``(http_server, bound_port)``; stop it with
    ``http_server.shutdown(); http_server.server_close()``.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics port must be in 0..65535, got {port}")
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_address[1])
    logger.info("metrics on http://%s:%d/metrics", host, bound)
    return server, bound
