"""Replay timing: recorded time (scaled by a speed factor) or as fast as possible; frame
skipping; looping. Cameras stay in sync because one schedule drives them all: every frame is
released at ``start + (timestamp - first_timestamp) / speed`` of the merged recording.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from client.frames import SourceFrame
from perception.errors import ConfigError


@dataclass(frozen=True)
class Pacing:
    """speed: 1.0 = recorded time, 2.0 = twice as fast, None = as fast as the server takes
    them. skip: after each frame sent, skip this many of the same camera. loop: start over at
    the end (sequence numbers and timestamps keep increasing). max_frames: stop after this
    many frames sent in total (0 = no limit)."""

    speed: float | None = 1.0
    skip: int = 0
    loop: bool = False
    max_frames: int = 0

    def __post_init__(self) -> None:
        if self.speed is not None and not self.speed > 0:
            raise ConfigError(f"speed must be positive, got {self.speed}")
        if self.skip < 0 or self.max_frames < 0:
            raise ConfigError("skip and max_frames must not be negative")


def paced(
    source: Iterable[SourceFrame],
    pacing: Pacing,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[SourceFrame]:
    """Yield the frames of ``source`` (re-iterated when looping) at their scheduled time."""
    stop = stop or threading.Event()
    seq_offset: dict[str, int] = defaultdict(int)
    ts_offset = 0
    start_wall: float | None = None
    first_ts: int | None = None
    sent = 0
    while True:
        count: dict[str, int] = defaultdict(int)
        span: dict[str, list[int]] = {}  # camera -> [first, last] timestamp of this lap
        for frame in source:
            count[frame.camera_id] = max(count[frame.camera_id], frame.sequence + 1)
            lo_hi = span.setdefault(frame.camera_id, [frame.timestamp_ns, frame.timestamp_ns])
            lo_hi[1] = frame.timestamp_ns
            if frame.sequence % (pacing.skip + 1):
                continue
            if ts_offset or seq_offset:
                frame = dataclasses.replace(
                    frame,
                    sequence=frame.sequence + seq_offset[frame.camera_id],
                    timestamp_ns=frame.timestamp_ns + ts_offset,
                )
            if pacing.speed is not None:
                if start_wall is None or first_ts is None:
                    start_wall, first_ts = clock(), frame.timestamp_ns
                due = start_wall + (frame.timestamp_ns - first_ts) / 1e9 / pacing.speed
                wait = due - clock()
                if wait > 0 and stop.wait(wait):
                    return
            if stop.is_set():
                return
            yield frame
            sent += 1
            if pacing.max_frames and sent >= pacing.max_frames:
                return
        if not pacing.loop or not count or stop.is_set():
            return
        # A lap lasts a camera's recorded span plus one of its mean frame periods.
        ts_offset += max((hi - lo) + (hi - lo) // max(1, count[cam] - 1) for cam, (lo, hi) in span.items())
        for cam, c in count.items():
            seq_offset[cam] += c
