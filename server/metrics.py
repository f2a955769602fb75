"""Prometheus metrics of the server, built on an injected registry.

Names follow ``perception_<what>_<unit>``; labels are bounded (stage, configured camera ids,
drop reason, class name, gRPC code) and never a frame id. The servicer and the scheduler call
the small methods below; nothing else in the server touches prometheus_client.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 1 ms .. ~1 s, roughly x1.5 apart: resolves the budget of a 30 fps camera (33 ms) finely.
LATENCY_BUCKETS = (
    0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
)
STAGES = ("queue", "preprocess", "inference", "postprocess", "end_to_end")
DROP_REASONS = ("stale", "expired", "invalid", "overloaded")
OTHER_CAMERA = "other"


class ServerMetrics:
    """Every metric the server exports. ``cameras`` bounds the camera label's values: frames
    from a camera not in the set are counted under ``"other"`` (None = accept any id, for tests
    and single-camera setups only)."""

    def __init__(self, registry: CollectorRegistry, cameras: frozenset[str] | None = None) -> None:
        self.registry = registry
        self._cameras = cameras
        self.stage_latency = Histogram(
            "perception_stage_latency_seconds",
            "Wall-clock time per frame spent in each pipeline stage.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.frames_received = Counter(
            "perception_frames_received", "Frames received, per camera.", ["camera"], registry=registry
        )
        self.frames_answered = Counter(
            "perception_frames_answered", "Frames answered with detections, per camera.", ["camera"], registry=registry
        )
        self.frames_dropped = Counter(
            "perception_frames_dropped",
            "Frames answered without detections, per camera and reason.",
            ["camera", "reason"],
            registry=registry,
        )

    def camera_label(self, camera_id: str) -> str:
        if self._cameras is None or camera_id in self._cameras:
            return camera_id or "unnamed"
        return OTHER_CAMERA

    def observe_stage(self, stage: str, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")
        self.stage_latency.labels(stage).observe(seconds)

    def frame_received(self, camera_id: str) -> None:
        self.frames_received.labels(self.camera_label(camera_id)).inc()

    def frame_answered(self, camera_id: str) -> None:
        self.frames_answered.labels(self.camera_label(camera_id)).inc()

    def frame_dropped(self, camera_id: str, reason: str) -> None:
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; known: {DROP_REASONS}")
        self.frames_dropped.labels(self.camera_label(camera_id), reason).inc()
