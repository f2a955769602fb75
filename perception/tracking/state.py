"""What a tracker answers, without the tracker: the states, a frame's result, a track's view.

Apart from ``tracker.py`` so that code that only reads tracks (the client's conversions and
sinks) imports neither the tracker nor its compiled loops (numba).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
from numpy.typing import NDArray


class TrackState(str, Enum):
    """Where a track stands after a frame. The value is the name shown to users."""

    NEW = "NEW"  # matched on every frame since its birth, fewer than confirm_hits times
    CONFIRMED = "CONFIRMED"  # matched on this frame, and confirmed
    COASTING = "COASTING"  # confirmed, not matched on this frame: its box is a prediction

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TrackResult:
    """The tracks of one frame's detections, in the order the detections came in.

    track_ids: (N,) int64, the track of each detection; 0 where none (a detection below
        ``low_score``, a low-score one that extended no track, one over ``max_tracks``).
    states: the state of that track after this frame (NEW or CONFIRMED: a track matched on
        this frame does not coast); None where the track id is 0.
    restarted: the tracker dropped every track first (the camera's time or sequence went back).
    late: the frame came after a later frame of its camera; it is not tracked (every id 0) and
        did not step the tracker.
    """

    track_ids: NDArray[np.int64]
    states: tuple[TrackState | None, ...]
    restarted: bool = False
    late: bool = False

    def __len__(self) -> int:
        return int(self.track_ids.shape[0])


@dataclass(frozen=True)
class TrackView:
    """A live track as of the last frame. box: x1 y1 x2 y2 pixels, the filtered box (the
    prediction when coasting)."""

    track_id: int
    class_id: int
    state: TrackState
    box: tuple[float, float, float, float]
    hits: int
    last_matched_ns: int
