"""Per-camera multi-object tracking, ByteTrack style, stepped by capture time.

Each frame (the detections after NMS, and the frame's capture timestamp in ns):

1. Order: a frame behind the previous one is one of three things.
   - Late: its sequence a little behind (by at most ``LATE_FRAMES``, and not back to 0) and
     its capture time too (by at most ``max_age_s``): a frame that arrived after a later one
     of its camera (two calls in flight, two streams of one camera during a reconnect). It is
     answered without tracks and does not step the tracker (``TrackResult.late``).
   - A clock step: its capture time a little behind (by at most ``max_age_s``) while its
     sequence goes on (or there is none), as when NTP or PTP steps the camera's clock: the
     tracks go on, predicted across no time.
   - Otherwise a restart (the sequence went back to 0 or far back, or the time far back): every
     track is dropped. Ids keep counting up: no id is reused by a tracker (nor by a pool of
     trackers, which share one counter).
2. Age: tracks not matched for more than ``max_age_s`` of capture time are dropped; the rest
   are predicted to this frame's time (``dt`` in seconds, so frames dropped upstream as stale
   or expired are predicted across, not counted).
3. Match, in three rounds, each a gated IoU matching within one class
   (``perception.tracking.assignment``'s rule; compiled with the rounds in
   ``perception.tracking.kernels``), each first by plain IoU and then, for what that left,
   by the IoU of boxes widened in proportion to the time since the previous frame
   (``buffer_per_s``), so that a fast object, or one across a dropped frame, still overlaps its
   prediction:
   a. high-score detections to confirmed and coasting tracks (``match_iou``);
   b. the high-score detections left to new tracks (``match_iou``): an established track wins
      a box over a new one, so a spurious new track cannot steal an identity;
   c. low-score detections to the confirmed tracks left, i.e. those matched on the previous
      frame (``low_match_iou``): an object that becomes partly occluded keeps its track, while
      a low-score box never starts a track nor revives a coasting one.
4. Update: a matched track takes its detection (Kalman update); a new track with
   ``confirm_hits`` matches, or a coasting one matched again, is confirmed. Unmatched: a new
   track is dropped, any other coasts on its prediction.
5. Birth: each high-score detection left starts a new track, within ``max_tracks`` (the
   coasting tracks unmatched the longest make room; past that the highest scores win).

Invariants: track ids are > 0 and unique within a tracker; a detection gets at most one track
and a track at most one detection per frame; a track's class never changes.

A Tracker is not thread-safe: one frame at a time (``TrackerPool`` serialises each camera).
"""

from __future__ import annotations

import operator
import threading
import time
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from perception.errors import InvalidInputError
from perception.tracking import kernels
from perception.tracking.config import TrackerConfig
from perception.tracking.kalman import BoxKalmanFilter
from perception.tracking.state import TrackResult, TrackState, TrackView
from perception.types import Detections

# Track ids are exact in a double (JSON readers in JavaScript) below 2**53: ``first_id_from_clock``
# leaves 1,024 per millisecond between two starts of a server.
MAX_TRACK_ID = 2**53 - 1
IDS_PER_MS = 1024

# Codes of the states in the tracker's state array (the kernels' own), index into _STATES.
_NEW, _CONFIRMED, _COASTING = kernels.NEW, kernels.CONFIRMED, kernels.COASTING
_STATES = (TrackState.NEW, TrackState.CONFIRMED, TrackState.COASTING)
_STATE_OR_NONE = (*_STATES, None)  # indexed by a code, or by -1 for "no track"
_NS_PER_S = 1_000_000_000
# How far behind the previous frame's sequence a frame may be and still be a late one rather
# than a camera restart: the frames a client keeps in flight (the client library's window is 32).
LATE_FRAMES = 32
# Capture times within this of 0 ns keep every sum and difference the tracker takes in int64
# (2**62 ns is 146 years either side of the clock's epoch); others are refused, not wrapped.
MAX_ABS_TIMESTAMP_NS = 2**62


class Tracker:
    """The tracks of one camera; see the module docstring for what one ``update`` does."""

    # The live tracks, one row each (struct of arrays: a frame costs a few numpy calls
    # whatever the number of tracks).
    _mean: NDArray[np.float64]  # (T, 8) Kalman means
    _cov: NDArray[np.float64]  # (T, 3, 4) Kalman covariances, per-coordinate blocks (see kalman)
    _ids: NDArray[np.int64]  # (T,) ascending
    _cls: NDArray[np.int64]  # (T,)
    _hits: NDArray[np.int64]  # (T,) frames matched, birth included
    _state: NDArray[np.int8]  # (T,) _NEW, _CONFIRMED or _COASTING
    _last_matched: NDArray[np.int64]  # (T,) capture time of the last match, ns

    def __init__(
        self,
        config: TrackerConfig | None = None,
        kalman: BoxKalmanFilter | None = None,
        new_ids: Callable[[int], int] | None = None,
    ) -> None:
        """new_ids: ``new_ids(k)`` is the first of ``k`` consecutive ids never given before
        (a ``TrackerPool`` shares one counter between its cameras, so that a camera forgotten
        and seen again, or another camera, never repeats an id); default: this tracker's own,
        from 1."""
        self.config = config if config is not None else TrackerConfig()
        self._kf = kalman if kalman is not None else BoxKalmanFilter()
        self._max_age_ns = int(round(self.config.max_age_s * _NS_PER_S))
        # The lowest round IoU, and the least float32 at or above it: float32 IoUs that pass
        # it are those at or above the gate in float64, as the rounds take them (a gate rounded
        # down to the nearest float32 would let in values below it).
        self._gate = float(min(self.config.match_iou, self.config.low_match_iou))
        gate32 = np.float32(self._gate)
        self._gate32 = gate32 if float(gate32) >= self._gate else np.nextafter(gate32, np.float32(np.inf))
        kernels.warm()
        self._new_ids = new_ids if new_ids is not None else IdCounter()
        self._last_ns: int | None = None
        self._last_sequence: int | None = None
        self._clear()

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def reset(self) -> None:
        """Drop every track and forget the last frame's time; ids still never repeat."""
        self._clear()
        self._last_ns = None
        self._last_sequence = None

    @property
    def last_timestamp_ns(self) -> int | None:
        """The capture time of the last frame (None before the first, and after ``reset``)."""
        return self._last_ns

    @property
    def last_sequence(self) -> int | None:
        """The sequence of the last frame (None before the first, after ``reset``, or when it
        came without one)."""
        return self._last_sequence

    def shift_clock(self, delta_ns: int) -> None:
        """Move every time the tracker holds by ``delta_ns``: the camera's frames go on on
        another clock (``TrackerPool`` does this when a camera that sent no capture time, and
        was tracked on the arrival clock, starts sending one)."""
        delta = int(delta_ns)
        moved = [t + delta for t in ([self._last_ns] if self._last_ns is not None else [])]
        if len(self):
            moved += [int(self._last_matched.min()) + delta, int(self._last_matched.max()) + delta]
        if any(abs(t) > MAX_ABS_TIMESTAMP_NS for t in moved):  # checked before anything is changed
            raise InvalidInputError(f"moving the camera's clock by {delta} ns takes its times past 2**62 ns")
        if self._last_ns is not None:
            self._last_ns += delta
        self._last_matched = self._last_matched + np.int64(delta)

    def rescale(self, sx: float, sy: float) -> None:
        """The camera's frames are now ``sx`` times as wide and ``sy`` times as tall in pixels (a
        camera node that lowers its resolution): every track's box, rate and uncertainty
        are scaled onto the new pixels, so the same objects keep their ids."""
        scale = np.array([sx, sy, sx, sy], np.float64)
        self._mean = self._mean * np.concatenate([scale, scale])
        self._cov = self._cov * (scale * scale)  # each row of the blocks: a coordinate's (pos, rate) pair

    def tracks(self) -> tuple[TrackView, ...]:
        """The live tracks, oldest id first."""
        boxes = _to_xyxy(self._mean)
        return tuple(
            TrackView(
                track_id=int(self._ids[i]),
                class_id=int(self._cls[i]),
                state=_STATES[self._state[i]],
                box=(float(boxes[i, 0]), float(boxes[i, 1]), float(boxes[i, 2]), float(boxes[i, 3])),
                hits=int(self._hits[i]),
                last_matched_ns=int(self._last_matched[i]),
            )
            for i in range(len(self))
        )

    def update(self, detections: Detections, timestamp_ns: int, sequence: int | None = None) -> TrackResult:
        """Step to the frame captured at ``timestamp_ns`` (ns, the camera's clock) with its
        detections (after NMS); ``sequence``, when given, is the frame's per-camera number.

        InvalidInputError for a non-integer timestamp or sequence, or non-finite boxes or scores.
        """
        ts = _as_int("timestamp_ns", timestamp_ns)
        if not -MAX_ABS_TIMESTAMP_NS <= ts <= MAX_ABS_TIMESTAMP_NS:
            raise InvalidInputError(f"timestamp_ns {ts} is more than 2**62 ns (146 years) from the clock's epoch")
        seq = None if sequence is None else _as_int("sequence", sequence)
        # The kernels' array types: an array of another layout, or a read-only one, would
        # compile them anew, mid-stream.
        boxes = kernels.kernel_array(np.reshape(detections.boxes, (-1, 4)), np.float64)
        scores = np.asarray(detections.scores, dtype=np.float64).reshape(-1)
        classes = kernels.kernel_array(np.reshape(detections.class_ids, (-1,)), np.int64)
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise InvalidInputError("detections with non-finite boxes or scores cannot be tracked")

        order = self._order(ts, seq)
        if order == "late":  # answered untracked; the tracker is left as it was
            return TrackResult(track_ids=np.zeros((boxes.shape[0],), np.int64), states=(None,) * boxes.shape[0],
                               late=True)
        restarted = order == "restart"
        if restarted:
            self._clear()
        dt = 0.0
        if not restarted and self._last_ns is not None and len(self):
            self._keep(ts - self._last_matched <= self._max_age_ns)
            dt = max(0.0, (ts - self._last_ns) / _NS_PER_S)  # a clock step back: predicted across no time
            if dt > 0 and len(self):
                self._mean, self._cov = self._kf.predict(self._mean, self._cov, dt)
        self._last_ns = ts
        self._last_sequence = seq

        n = int(boxes.shape[0])
        out_ids = np.zeros((n,), np.int64)
        out_codes = np.full((n,), -1, np.int8)
        cfg = self.config
        high = np.flatnonzero(scores >= cfg.high_score)
        low = np.flatnonzero((scores >= cfg.low_score) & (scores < cfg.high_score))

        left = high
        if len(self) and n:
            open_high = np.zeros((n,), bool)
            open_high[high] = True
            open_low = np.zeros((n,), bool)
            open_low[low] = True
            before = self._state.copy()
            buffer = min(cfg.buffer_per_s * dt, cfg.max_buffer)
            # Rounds 3a-3c, each by plain IoU, then by the widened boxes (when buffer > 0),
            # before the next round: an established track wins a box over a new one even
            # through the widened boxes. (Plain IoU for every round first did better in a
            # synthetic crowd and worse on the drives: docs/tracking.md.)
            t, d, free = kernels.associate(self._mean, self._cls, before, boxes, classes, open_high, open_low,
                                           float(buffer), self._gate32, self._gate, float(cfg.match_iou),
                                           float(cfg.low_match_iou))
            left = np.flatnonzero(open_high)
            if t.size:
                self._mean[t], self._cov[t] = self._kf.update(self._mean[t], self._cov[t], _to_cxcywh(boxes[d]))
                self._hits[t] += 1
                self._last_matched[t] = ts
                self._state[t] = np.where((before[t] == _NEW) & (self._hits[t] < cfg.confirm_hits), _NEW, _CONFIRMED)
                out_ids[d] = self._ids[t]
                out_codes[d] = self._state[t]
            self._state[free & (before != _NEW)] = _COASTING
            self._keep(~(free & (before == _NEW)))
        elif len(self):  # no detections: every track missed this frame
            self._keep(self._state != _NEW)
            self._state[:] = _COASTING

        born = self._birth(left, boxes, scores, classes, ts)
        out_ids[born] = self._ids[len(self) - born.size :]
        out_codes[born] = _NEW if cfg.confirm_hits > 1 else _CONFIRMED
        states = tuple(map(_STATE_OR_NONE.__getitem__, out_codes.tolist()))
        return TrackResult(track_ids=out_ids, states=states, restarted=bool(restarted))

    # --- internals --------------------------------------------------------------------------

    def _order(self, ts: int, seq: int | None) -> str:
        """"next", "late", "clock step" or "restart": a frame at ``ts`` / ``seq`` against the
        previous one (see the module docstring)."""
        if self._last_ns is None:
            return "next"
        last_seq = self._last_sequence
        behind_ns = self._last_ns - ts
        if seq is not None and last_seq is not None and seq < last_seq:
            late = seq > 0 and last_seq - seq <= LATE_FRAMES and 0 <= behind_ns <= self._max_age_ns
            return "late" if late else "restart"
        if behind_ns <= 0:
            return "next"
        return "clock step" if behind_ns <= self._max_age_ns else "restart"

    def _birth(
        self,
        dets: NDArray[np.int64],
        boxes: NDArray[np.float64],
        scores: NDArray[np.float64],
        classes: NDArray[np.int64],
        ts: int,
    ) -> NDArray[np.int64]:
        """Start a track for each of ``dets`` (ascending) that fits; returns those, ascending,
        in the order their tracks were appended."""
        wh = boxes[dets, 2:] - boxes[dets, :2]
        dets = dets[(wh > 0).all(axis=1)]  # a degenerate box has no IoU with anything: no track
        if dets.size == 0:
            return dets
        cap = self.config.max_tracks
        short = dets.size - (cap - len(self))
        if short > 0:
            coasting = np.flatnonzero(self._state == _COASTING)
            if coasting.size:
                # Oldest match first; ties by age of the track (ids grow with time).
                order = np.lexsort((self._ids[coasting], self._last_matched[coasting]))
                drop = np.zeros((len(self),), bool)
                drop[coasting[order[:short]]] = True
                self._keep(~drop)
            room = cap - len(self)
            if dets.size > room:
                dets = np.sort(dets[np.argsort(-scores[dets], kind="stable")[:room]])
        if dets.size == 0:
            return dets
        mean, cov = self._kf.initiate(_to_cxcywh(boxes[dets]))
        k = dets.size
        self._mean = np.concatenate([self._mean, mean])
        self._cov = np.concatenate([self._cov, cov])
        first = self._new_ids(k)
        self._ids = np.concatenate([self._ids, np.arange(first, first + k, dtype=np.int64)])
        self._cls = np.concatenate([self._cls, classes[dets]])
        self._hits = np.concatenate([self._hits, np.ones((k,), np.int64)])
        code = _NEW if self.config.confirm_hits > 1 else _CONFIRMED
        self._state = np.concatenate([self._state, np.full((k,), code, np.int8)])
        self._last_matched = np.concatenate([self._last_matched, np.full((k,), ts, np.int64)])
        return dets

    def _clear(self) -> None:
        self._mean = np.zeros((0, 8), np.float64)
        self._cov = np.zeros((0, 3, 4), np.float64)
        self._ids = np.zeros((0,), np.int64)
        self._cls = np.zeros((0,), np.int64)
        self._hits = np.zeros((0,), np.int64)
        self._state = np.zeros((0,), np.int8)
        self._last_matched = np.zeros((0,), np.int64)

    def _keep(self, mask: NDArray[np.bool_]) -> None:
        if mask.all():
            return
        self._mean = self._mean[mask]
        self._cov = self._cov[mask]
        self._ids = self._ids[mask]
        self._cls = self._cls[mask]
        self._hits = self._hits[mask]
        self._state = self._state[mask]
        self._last_matched = self._last_matched[mask]


class IdCounter:
    """Track ids from ``first`` up, never repeated; ``counter(k)`` takes ``k`` of them at once
    and returns the first. Thread-safe, so that one counter can serve every camera of a pool."""

    def __init__(self, first: int = 1) -> None:
        if not 1 <= first <= MAX_TRACK_ID:
            raise ValueError(f"the first track id must be in 1..{MAX_TRACK_ID}, got {first}")
        self._next = first
        self._lock = threading.Lock()

    def __call__(self, k: int) -> int:
        with self._lock:
            first = self._next
            self._next += k
            return first


def first_id_from_clock(now_ns: int | None = None) -> int:
    """A first track id that no earlier start of a server handed out: the wall-clock
    millisecond times ``IDS_PER_MS``. A consumer that keys state by track id (a planner, a log
    joined across a restart) then never takes a track of the server's next start for one of its
    last, as it would if every start counted from 1. A run that hands out fewer than
    ``IDS_PER_MS`` ids per millisecond of its life, on a clock that does not step back, never
    reaches the next start's ids; they stay below 2**53 (exact as a JSON number read by
    JavaScript) until the year 2248."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    return ms * IDS_PER_MS + 1


def _to_cxcywh(xyxy: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], axis=1)


def _to_xyxy(mean: NDArray[np.float64]) -> NDArray[np.float64]:
    """x1 y1 x2 y2 of the filtered boxes; a side the filter drove negative is taken as 0."""
    half = np.maximum(mean[:, 2:4], 0.0) / 2
    return np.concatenate([mean[:, :2] - half, mean[:, :2] + half], axis=1)


def _as_int(name: str, value: int) -> int:
    if isinstance(value, bool):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidInputError(f"{name} must be an integer, got {value!r}") from None
