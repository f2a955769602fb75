"""The trackers of every camera, bounded in count and in time.

Keyed by camera id (any hashable the caller picks; key by the camera, not by the stream, so a
stream that reconnects finds its camera's tracks). A camera not updated for ``ttl_s`` (on the
pool's monotonic clock, not the cameras' capture clocks) is forgotten, and so is the least
recently updated one when a new camera would exceed ``max_cameras``: a client inventing camera
ids cannot grow the table. Each tracker holds at most ``max_tracks`` tracks (about 200 bytes
each: a 3x4 float64 covariance block and an 8-vector, mostly), and each camera remembers its
last frames' detections for re-sends within ``RESENT_DETECTIONS`` (about 44 bytes each), so
the pool's memory is bounded by ``max_cameras`` times both: 64 cameras at 200 tracks, about
2.6 MB of tracks and at most 23 MB of remembered detections.

Thread-safe: the pool's lock covers only the table (lookup, recency, eviction); each camera's
frames are stepped under that camera's own lock, one at a time, so no camera waits for another
camera's frame. A frame of a camera being forgotten at that moment is still tracked; the tracks
are dropped afterwards.

What a live stream adds on top of ``Tracker.update``:

- **One id counter for the pool.** A camera forgotten and seen again starts a new tracker,
  whose ids go on from the pool's counter: an id never names two objects within a pool.
- **Re-sent frames.** A client that reconnects sends again the frames it had no answer for,
  some of which the server may have tracked already. The client library marks them
  (``Frame.resent``, ``resent=True`` here). A marked frame whose sequence is not past the
  camera's last, and which is one of its last ``RESENT_FRAMES`` frames (same sequence and
  capture time, and at least half of its detections where the first answer had one of their
  class, IoU >= ``RESENT_IOU``), is answered with the track ids those boxes got the first time
  (0 for the others: another model may have answered it) and does not step the tracker; a
  marked frame the tracker has moved past without tracking it (answered stale the first time)
  is answered without tracks, and does not step it either. A frame not marked (``resent=False``)
  whose sequence goes back is a camera restart: the same recording replayed again within
  ``ttl_s`` numbers, stamps and detects its frames exactly as the first time, and was answered
  with the first replay's track ids from memory. A caller that cannot say (``resent=None``)
  gets the test above without the mark, and a sequence going back otherwise is a restart.
- **Cameras without capture times** (``timestamp_ns`` 0 with ``arrival_s``): the frame is
  stepped on the arrival clock, continued from the camera's last frame. A camera that starts
  sending capture times after such frames (a recording whose first frame is at time 0) has its
  tracker's clock moved onto them, rather than being taken for a camera whose time went back.
- **The model's classes.** Tracks hold class indices; when the frames come from a model with
  other classes (a hot swap), the camera's tracks are dropped rather than continued under
  another class's name.
- **The frames' size.** Boxes are in the frame's pixels. A camera that changes resolution (a
  camera node lowering it under load) keeps its tracks, scaled onto the new pixels; one whose
  frames change aspect shows another view, and its tracks are reset. (Before, tracks went on
  in the old pixels: none matched, every object got a new id, and the old tracks coasted as
  ghosts where the objects had been.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from perception.boxes import box_iou
from perception.tracking import kernels
from perception.tracking.config import TrackerConfig
from perception.tracking.kalman import BoxKalmanFilter
from perception.tracking.state import TrackResult, TrackView
from perception.tracking.tracker import IdCounter, Tracker
from perception.types import Detections

log = logging.getLogger(__name__)

# Frames remembered per camera to recognise a re-send: more than a client keeps in flight (the
# client library's window is at most 32 frames).
RESENT_FRAMES = 64
# ... and at most this many of their detections in all (the oldest frames go first; the last
# frame is always kept): a client asking for a thousand detections a frame made the memory of
# 64 frames of 64 cameras 180 MB. At about 44 bytes a detection, 0.36 MB a camera at most
# (a window of 32 frames in flight at 256 detections each).
RESENT_DETECTIONS = 8 * 1024
# A re-sent frame's box is the first answer's box of its class that it overlaps this much: the
# same bytes through the same model, or through another variant after a degrade step or a swap.
RESENT_IOU = 0.7
_NS_PER_S = 1_000_000_000
# Frames of a camera that change size with their aspect within this fraction show the same view
# at another resolution (1280x720 -> 960x540, or 1920x1080 -> 1280x736 with its encoder's rounding).
SAME_VIEW_ASPECT = 0.03


@dataclass(eq=False)
class _Entry:
    tracker: Tracker
    last_used: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    # sequence -> (the capture time it came with, its detections, its result), the last
    # RESENT_FRAMES frames
    recent: OrderedDict[int, tuple[int, Detections, TrackResult]] = field(default_factory=OrderedDict)
    recent_detections: int = 0  # how many detections ``recent`` holds
    last_arrival_s: float | None = None  # when the last frame arrived (server clock), if known
    on_arrival_clock: bool = False  # the last frame had no capture time
    classes: tuple[str, ...] | None = None  # of the model whose detections were tracked
    frame_size: tuple[int, int] | None = None  # (width, height) of the last frame stepped, if known


class TrackerPool:
    """A ``Tracker`` per camera, made on the camera's first frame; see the module docstring.

    clock: seconds, monotonic (injected for tests). first_id: the first track id handed out
    (a server's: ``first_id_from_clock``, so that its ids never repeat an earlier start's).
    """

    def __init__(
        self,
        config: TrackerConfig | None = None,
        kalman: BoxKalmanFilter | None = None,
        clock: Callable[[], float] = time.monotonic,
        first_id: int = 1,
    ) -> None:
        self.config = config if config is not None else TrackerConfig()
        self._kalman = kalman if kalman is not None else BoxKalmanFilter()
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # least recently used first
        self._new_ids = IdCounter(first_id)
        kernels.warm()  # compiled (or loaded) now, not on a camera's first tracked frame

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._entries)

    def __contains__(self, camera_id: Hashable) -> bool:
        with self._lock:
            self._expire(self._clock())
            return camera_id in self._entries

    def update(
        self,
        camera_id: Hashable,
        detections: Detections,
        timestamp_ns: int,
        sequence: int | None = None,
        *,
        arrival_s: float | None = None,
        classes: tuple[str, ...] | None = None,
        resent: bool | None = None,
        frame_size: tuple[int, int] | None = None,
    ) -> TrackResult:
        """Step ``camera_id``'s tracker with one frame (``Tracker.update``), making it if new.

        arrival_s: when the frame arrived (seconds, a monotonic clock); with it, a
        ``timestamp_ns`` of 0 means the camera sent no capture time. classes: the class names
        of the model the detections come from. resent: whether the client says it sends the
        frame again after a reconnect (None: it does not say). frame_size: the frame's (width,
        height) in the pixels of its boxes. See the module docstring for all four.
        """
        entry = self._entry(camera_id)
        with entry.lock:
            if classes is not None and entry.classes is not None and classes != entry.classes:
                log.info("camera %r: the model's classes changed; its tracks were reset", camera_id)
                self._reset(entry)
            entry.classes = classes if classes is not None else entry.classes
            if resent is not False:  # a frame the client does not call re-sent is never one
                again = self._resent(entry, timestamp_ns, sequence, detections)
                if again is not None:
                    return again
                last = entry.tracker.last_sequence
                if resent and sequence is not None and last is not None and sequence <= last:
                    # Re-sent, and the tracker has moved past it without tracking it (answered
                    # stale the first time, say): no tracks, and no restart of the camera.
                    return TrackResult(track_ids=np.zeros(len(detections), np.int64),
                                       states=(None,) * len(detections))
            self._resize(camera_id, entry, frame_size)
            tracker = entry.tracker
            unknown = timestamp_ns == 0 and arrival_s is not None
            elapsed_ns = 0
            if arrival_s is not None and entry.last_arrival_s is not None:
                elapsed_ns = int(round(max(0.0, arrival_s - entry.last_arrival_s) * _NS_PER_S))
            last = tracker.last_timestamp_ns
            if timestamp_ns == 0 and arrival_s is not None:  # no capture time: the arrival clock
                ts = int(round(arrival_s * _NS_PER_S)) if last is None else last + elapsed_ns
            else:
                ts = timestamp_ns
                if entry.on_arrival_clock and last is not None and arrival_s is not None:
                    # Onto the camera's own clock: its last frame was this long before this one.
                    tracker.shift_clock(ts - elapsed_ns - last)
            result = tracker.update(detections, ts, sequence)
            if result.late:  # untracked, the tracker as it was: nothing of the camera's changes
                return result
            entry.on_arrival_clock = unknown
            entry.last_arrival_s = arrival_s
            if result.restarted:
                self._forget_recent(entry)
            if sequence is not None:
                self._remember(entry, sequence, (timestamp_ns, detections, result))
        if result.restarted:
            log.info("camera %r restarted (capture time or sequence went back): its tracks were reset", camera_id)
        return result

    @staticmethod
    def _remember(entry: _Entry, sequence: int, frame: tuple[int, Detections, TrackResult]) -> None:
        """Keep ``frame`` among the camera's recent ones, within RESENT_FRAMES frames and
        RESENT_DETECTIONS detections."""
        old = entry.recent.pop(sequence, None)
        if old is not None:
            entry.recent_detections -= len(old[1])
        entry.recent[sequence] = frame
        entry.recent_detections += len(frame[1])
        while len(entry.recent) > RESENT_FRAMES or (len(entry.recent) > 1
                                                   and entry.recent_detections > RESENT_DETECTIONS):
            _, dropped = entry.recent.popitem(last=False)
            entry.recent_detections -= len(dropped[1])

    @staticmethod
    def _forget_recent(entry: _Entry) -> None:
        entry.recent.clear()
        entry.recent_detections = 0

    @staticmethod
    def _resent(entry: _Entry, timestamp_ns: int, sequence: int | None, detections: Detections) -> TrackResult | None:
        """The result a re-sent frame got the first time; None if it is not one."""
        last = entry.tracker.last_sequence
        if sequence is None or last is None or sequence > last:
            return None
        if timestamp_ns == 0 and sequence == last:
            return None  # no capture time: a camera that numbers no frames sends 0, 0 every time
        seen = entry.recent.get(sequence)
        if seen is None or seen[0] != timestamp_ns:
            return None
        match = _match_first(seen[1], detections)
        if match is None:
            return None
        first = seen[2]
        ids = np.where(match >= 0, first.track_ids[np.maximum(match, 0)], 0).astype(np.int64)
        return TrackResult(track_ids=ids, states=tuple(first.states[m] if m >= 0 else None for m in match.tolist()))

    @staticmethod
    def _resize(camera_id: Hashable, entry: _Entry, size: tuple[int, int] | None) -> None:
        """A camera whose frames changed size: the same view at another resolution (the aspect
        within ``SAME_VIEW_ASPECT``) has its tracks scaled onto the new pixels; another view
        (a crop, another sensor mode) is a new scene, and its tracks are reset."""
        if size is None or min(size) <= 0:  # not known: the last size stays the reference
            return
        old, entry.frame_size = entry.frame_size, size
        if old is None or size == old:
            return
        sx, sy = size[0] / old[0], size[1] / old[1]
        if abs(sx / sy - 1.0) <= SAME_VIEW_ASPECT:
            entry.tracker.rescale(sx, sy)
            log.info("camera %r: frames went from %dx%d to %dx%d; its tracks were scaled", camera_id, *old, *size)
        else:
            entry.tracker.reset()
            TrackerPool._forget_recent(entry)
            log.info("camera %r: frames went from %dx%d to %dx%d, another view; its tracks were reset",
                     camera_id, *old, *size)

    @staticmethod
    def _reset(entry: _Entry) -> None:
        entry.tracker.reset()
        TrackerPool._forget_recent(entry)
        entry.last_arrival_s = None
        entry.on_arrival_clock = False

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
                entry = _Entry(Tracker(self.config, self._kalman, self._new_ids), now)
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


def _match_first(first: Detections, again: Detections) -> NDArray[np.int64] | None:
    """For each of ``again``'s detections, the index of the box of ``first`` it is (same class,
    the highest IoU, at least RESENT_IOU; -1 if none), in any order; None when fewer than half
    of them have one (another frame than the first, not a re-send)."""
    n = len(again)
    if n == 0 or len(first) == 0:
        return np.full((n,), -1, np.int64) if n == len(first) else None
    iou = box_iou(np.asarray(again.boxes, np.float32), np.asarray(first.boxes, np.float32))
    iou[np.asarray(again.class_ids)[:, None] != np.asarray(first.class_ids)[None, :]] = 0.0
    best = np.argmax(iou, axis=1)
    ok = iou[np.arange(n), best] >= RESENT_IOU
    match = np.where(ok, best, -1).astype(np.int64)
    taken = match[ok]
    if np.unique(taken).size != taken.size:  # two boxes on one: keep the first of each
        seen: set[int] = set()
        for k, m in enumerate(match.tolist()):
            if m >= 0:
                match[k] = -1 if m in seen else m
                seen.add(m)
    return match if 2 * int((match >= 0).sum()) >= max(n, len(first)) else None
