"""Per-camera multi-object tracking of detections, ByteTrack style, stepped by capture time.

``Tracker`` tracks one camera (``tracker.py`` states what one frame does), ``TrackerPool``
holds one per camera within bounds, ``TrackerConfig`` sets both. Framework-free: numpy, scipy
for the assignment, and numba to compile the per-frame loops (``kernels``).

The tracker, the pool, the filter and the matching are imported on first use: code that only
reads tracks (``TrackState``, ``TrackResult``, ``TrackView``: the client's conversions and
sinks) does not load numba, about 150 MB of a process's memory.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from perception.tracking.config import TrackerConfig
from perception.tracking.state import TrackResult, TrackState, TrackView

if TYPE_CHECKING:
    from perception.tracking.assignment import match_by_iou
    from perception.tracking.kalman import BoxKalmanFilter, KalmanNoise, full_covariance
    from perception.tracking.pool import TrackerPool
    from perception.tracking.tracker import Tracker

_LAZY = {
    "BoxKalmanFilter": "perception.tracking.kalman",
    "KalmanNoise": "perception.tracking.kalman",
    "full_covariance": "perception.tracking.kalman",
    "TrackerPool": "perception.tracking.pool",
    "Tracker": "perception.tracking.tracker",
    "match_by_iou": "perception.tracking.assignment",
}

__all__ = [
    "BoxKalmanFilter",
    "KalmanNoise",
    "TrackResult",
    "TrackState",
    "TrackView",
    "Tracker",
    "TrackerConfig",
    "TrackerPool",
    "full_covariance",
    "match_by_iou",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
