"""The server's multi-object trackers, loaded when a frame first asks for tracks.

The tracker's compiled loops bring numba, about 150 MB of a server's memory (docs/tracking.md);
a server nobody asks for tracks does without them, which keeps 32 streams of 8 MiB frames
under the 600 MB the soak bench holds the server to (a server that tracks carries them: over
it). The first tracked frame then waits for the load (1.4 s measured with numba's cache, about
10 s on an empty one); a deployment that tracks from its first frame loads them at start
instead (``--preload-tracker``).

A load that fails (numba missing, its compile failing) fails no stream: the frames that asked
for tracks are answered without them, saying why (``TrackerUnavailable``), and the load is tried
again no sooner than ``RETRY_S`` later, so that frames do not queue behind a load failing again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from perception.errors import PerceptionError
from perception.tracking import TrackerConfig, TrackResult
from perception.types import Detections

if TYPE_CHECKING:
    from perception.tracking.pool import TrackerPool

log = logging.getLogger(__name__)

RETRY_S = 60.0  # after a failed load, the next one is tried no sooner than this


class TrackerUnavailable(PerceptionError):
    """The tracker could not be loaded: the frame is answered without track ids."""


class Trackers:
    """A ``perception.tracking.TrackerPool`` made on the first ``update`` (or by ``load``);
    thread-safe: frames that ask for tracks while it loads wait for it."""

    def __init__(self, config: TrackerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._pool: TrackerPool | None = None
        self._failed: tuple[float, str] | None = None  # when the last load failed, and why

    @property
    def loaded(self) -> bool:
        return self._pool is not None

    def update(self, camera_id: Hashable, detections: Detections, timestamp_ns: int, sequence: int | None = None, *,
               arrival_s: float | None = None, classes: tuple[str, ...] | None = None,
               resent: bool | None = None, frame_size: tuple[int, int] | None = None) -> TrackResult:
        """``TrackerPool.update``, the pool loaded first if it is not yet. TrackerUnavailable
        when it cannot be."""
        pool = self._pool if self._pool is not None else self._load(retry_now=False)
        return pool.update(camera_id, detections, timestamp_ns, sequence, arrival_s=arrival_s, classes=classes,
                           resent=resent, frame_size=frame_size)

    def load(self) -> bool:
        """Load the tracker now (``--preload-tracker``); whether it loaded. A server whose tracker
        cannot be loaded serves all the same (the failure is logged; tracked frames are answered
        without tracks, and the load tried again as ``update`` tries it)."""
        try:
            self._load(retry_now=True)
        except TrackerUnavailable:
            return False
        return True

    def _load(self, retry_now: bool) -> TrackerPool:
        with self._lock:
            if self._pool is not None:
                return self._pool
            now = self._clock()
            if self._failed is not None and not retry_now and now - self._failed[0] < RETRY_S:
                raise TrackerUnavailable(self._failed[1])
            try:
                from perception.tracking.pool import TrackerPool  # numba: only once tracks are asked for
                from perception.tracking.tracker import first_id_from_clock

                # Ids no earlier start of the server gave: a consumer keyed by track id does not
                # take a new track for an old one after a restart.
                self._pool = TrackerPool(self._config, first_id=first_id_from_clock())
            except Exception as exc:  # whatever the import or the compile raised: no stream ends on it
                why = f"the tracker could not be loaded ({type(exc).__name__}: {exc}); tried again after {RETRY_S:g} s"
                log.exception("%s", why)
                self._failed = (now, why)
                raise TrackerUnavailable(why) from exc
            log.info("multi-object tracker loaded in %.1f s", self._clock() - now)
            self._failed = None
            return self._pool
