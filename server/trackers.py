"""The server's multi-object trackers, loaded when a frame first asks for tracks.

The tracker's compiled loops bring numba, about 150 MB of a server's memory (docs/tracking.md);
a server nobody asks for tracks does without them, which keeps 32 streams of 8 MiB frames
under the 600 MB the soak bench holds the server to. The first tracked frame then waits for the
load (about 2.5 s with numba's cache, 10 s on an empty one); a deployment that tracks from its
first frame loads them at start instead (``--preload-tracker``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING

from perception.tracking import TrackerConfig, TrackResult
from perception.types import Detections

if TYPE_CHECKING:
    from perception.tracking.pool import TrackerPool

log = logging.getLogger(__name__)


class Trackers:
    """A ``perception.tracking.TrackerPool`` made on the first ``update`` (or at once with
    ``preload``); thread-safe: frames that ask for tracks while it loads wait for it."""

    def __init__(self, config: TrackerConfig, preload: bool = False) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._pool: TrackerPool | None = None
        if preload:
            self._load()

    @property
    def loaded(self) -> bool:
        return self._pool is not None

    def update(self, camera_id: Hashable, detections: Detections, timestamp_ns: int, sequence: int | None = None, *,
               arrival_s: float | None = None, classes: tuple[str, ...] | None = None) -> TrackResult:
        """``TrackerPool.update``, the pool loaded first if it is not yet."""
        pool = self._pool if self._pool is not None else self._load()
        return pool.update(camera_id, detections, timestamp_ns, sequence, arrival_s=arrival_s, classes=classes)

    def _load(self) -> TrackerPool:
        with self._lock:
            if self._pool is None:
                from perception.tracking.pool import TrackerPool  # numba: only once tracks are asked for

                start = time.monotonic()
                self._pool = TrackerPool(self._config)
                log.info("multi-object tracker loaded in %.1f s", time.monotonic() - start)
            return self._pool
