"""The trackers of every camera, bounded in count and in time.

Keyed by camera id (any hashable the caller picks; key by the camera, not by the stream, so a
stream that reconnects finds its camera's tracks). A camera not updated for ``ttl_s`` (on the
pool's monotonic clock, not the cameras' capture clocks) is forgotten, and so is the least
recently updated one when a new camera would exceed ``max_cameras``: a client inventing camera
ids cannot grow the table. Each tracker holds at most ``max_tracks`` tracks, so the pool's
memory is bounded by ``max_cameras * max_tracks`` tracks (about 200 bytes each: a 3x4
float64 covariance block and an 8-vector, mostly).

Thread-safe: the pool's lock covers only the table (lookup, recency, eviction); each camera's
frames are stepped under that camera's own lock, one at a time, so no camera waits for another
camera's frame. A frame of a camera being forgotten at that moment is still tracked; the tracks
are dropped afterwards.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from perception.tracking.config import TrackerConfig
from perception.tracking.kalman import BoxKalmanFilter
from perception.tracking.tracker import Tracker, TrackResult, TrackView
from perception.types import Detections

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Entry:
    tracker: Tracker
    last_used: float
    lock: threading.Lock = field(default_factory=threading.Lock)


class TrackerPool:
    """A ``Tracker`` per camera, made on the camera's first frame; see the module docstring.

    clock: seconds, monotonic (injected for tests).
    """

    def __init__(
        self,
        config: TrackerConfig | None = None,
        kalman: BoxKalmanFilter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config if config is not None else TrackerConfig()
        self._kalman = kalman if kalman is not None else BoxKalmanFilter()
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._entries)

    def __contains__(self, camera_id: Hashable) -> bool:
        with self._lock:
            self._expire(self._clock())
            return camera_id in self._entries

    def update(
        self, camera_id: Hashable, detections: Detections, timestamp_ns: int, sequence: int | None = None
    ) -> TrackResult:
        """Step ``camera_id``'s tracker with one frame (``Tracker.update``), making it if new."""
        entry = self._entry(camera_id)
        with entry.lock:
            result = entry.tracker.update(detections, timestamp_ns, sequence)
        if result.restarted:
            log.info("camera %r restarted (capture time or sequence went back): its tracks were reset", camera_id)
        return result

    def tracks(self, camera_id: Hashable) -> tuple[TrackView, ...]:
        """The live tracks of ``camera_id`` as of its last frame; () for an unknown camera.
        Reading does not count as use: it keeps no camera alive."""
        with self._lock:
            self._expire(self._clock())
            entry = self._entries.get(camera_id)
        if entry is None:
            return ()
        with entry.lock:
            return entry.tracker.tracks()

    def discard(self, camera_id: Hashable) -> None:
        """Forget ``camera_id`` now (e.g. the camera was removed); no-op if unknown."""
        with self._lock:
            self._entries.pop(camera_id, None)

    def _entry(self, camera_id: Hashable) -> _Entry:
        now = self._clock()
        with self._lock:
            self._expire(now)
            entry = self._entries.get(camera_id)
            if entry is None:
                while len(self._entries) >= self.config.max_cameras:
                    old, _ = self._entries.popitem(last=False)
                    log.debug("forgot the tracks of camera %r: over max_cameras=%d", old, self.config.max_cameras)
                entry = _Entry(Tracker(self.config, self._kalman), now)
                self._entries[camera_id] = entry
            else:
                entry.last_used = now
                self._entries.move_to_end(camera_id)
            return entry

    def _expire(self, now: float) -> None:
        """Forget the cameras unused for more than ttl_s. Called under the lock; the table is in
        order of use, so only its front is looked at."""
        while self._entries:
            camera_id, entry = next(iter(self._entries.items()))
            if now - entry.last_used <= self.config.ttl_s:
                break
            del self._entries[camera_id]
            log.debug("forgot the tracks of camera %r: unused for over ttl_s=%g s", camera_id, self.config.ttl_s)
