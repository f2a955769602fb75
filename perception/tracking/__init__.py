"""Per-camera multi-object tracking of detections, ByteTrack style, stepped by capture time.

``Tracker`` tracks one camera (``tracker.py`` states what one frame does), ``TrackerPool``
holds one per camera within bounds, ``TrackerConfig`` sets both. Framework-free: numpy, scipy
for the assignment, and numba to compile the per-frame loops (``kernels``).
"""

from perception.tracking.assignment import match_by_iou
from perception.tracking.config import TrackerConfig
from perception.tracking.kalman import BoxKalmanFilter, KalmanNoise, full_covariance
from perception.tracking.pool import TrackerPool
from perception.tracking.tracker import Tracker, TrackResult, TrackState, TrackView

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
