"""Bounded camera label values for metrics when the server has no camera allow-list.

Without an allow-list every camera id a client sends would become a Prometheus series. The
first ``limit`` distinct ids are admitted as their own label value; later ones, and ids no
camera may have (longer than MAX_CAMERA_ID_LEN), are counted under "other".
"""

from __future__ import annotations

import threading
from typing import Any

from perception.pipeline import MAX_CAMERA_ID_LEN
from server.metrics import OTHER_CAMERA, ServerMetrics


class CameraLabels:
    """First-come label policy: at most ``limit`` camera ids (+ "other") ever appear."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"camera label limit must be >= 0, got {limit}")
        self.limit = limit
        self._admitted: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, camera_id: str) -> str:
        """The label value ``camera_id`` is counted under."""
        if len(camera_id) > MAX_CAMERA_ID_LEN or camera_id == OTHER_CAMERA:
            return OTHER_CAMERA
        with self._lock:
            if camera_id in self._admitted:
                return camera_id
            if len(self._admitted) < self.limit:
                self._admitted.add(camera_id)
                return camera_id
        return OTHER_CAMERA


class CameraLabelledMetrics:
    """``ServerMetrics`` (built with ``cameras=None``) whose per-camera methods see bounded labels.

    Everything else is passed through unchanged.
    """

    def __init__(self, metrics: ServerMetrics, labels: CameraLabels) -> None:
        self._metrics = metrics
        self._labels = labels

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metrics, name)

    def frame_received(self, camera_id: str) -> None:
        self._metrics.frame_received(self._labels(camera_id))

    def frame_answered(self, camera_id: str) -> None:
        self._metrics.frame_answered(self._labels(camera_id))

    def frame_dropped(self, camera_id: str, reason: str) -> None:
        self._metrics.frame_dropped(self._labels(camera_id), reason)

    def camera_label(self, camera_id: str) -> str:
        return self._metrics.camera_label(self._labels(camera_id))
