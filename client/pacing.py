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
from client.sources.base import SourceOptions
from perception.errors import ConfigError


@dataclass(frozen=True)
class Pacing:
    """speed: 1.0 = recorded time, 2.0 = twice as fast, None = as fast as the server takes
    them. skip: after each frame sent, skip this many of the same camera. loop: start over at
    the end (sequence numbers and timestamps keep increasing). max_frames: stop after this
    many frames sent in total (0 = no limit). fps: the frame rate of a loop where neither the
    source states one (a video does) nor a camera's frames give one (a single frame, or all
    stamped alike); such a camera's lap lasts one frame period."""

    speed: float | None = 1.0
    skip: int = 0
    loop: bool = False
    max_frames: int = 0
    fps: float = SourceOptions.fps

    def __post_init__(self) -> None:
        if self.speed is not None and not self.speed > 0:
            raise ConfigError(f"speed must be positive, got {self.speed}")
        if not self.fps > 0:
            raise ConfigError(f"fps must be positive, got {self.fps}")
        if self.skip < 0 or self.max_frames < 0:
            raise ConfigError("skip and max_frames must not be negative")


def select(source: Iterable[SourceFrame], pacing: Pacing) -> Iterator[SourceFrame]:
    """The frames a replay sends, in order, without waiting: ``skip`` applied, laps of a
    ``loop`` renumbered (sequence numbers and timestamps keep increasing), at most
    ``max_frames``. Endless for a ``loop`` without ``max_frames``."""
    seq_offset: dict[str, int] = defaultdict(int)
    ts_offset = 0
    period_ns = round(1e9 / (getattr(source, "fps", 0.0) or pacing.fps))
    selected = 0
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
            yield frame
            selected += 1
            if pacing.max_frames and selected >= pacing.max_frames:
                return
        if not pacing.loop or not count:
            return
        ts_offset += max(_lap_ns(lo, hi, count[cam], period_ns) for cam, (lo, hi) in span.items())
        for cam, c in count.items():
            seq_offset[cam] += c


def _lap_ns(first_ns: int, last_ns: int, frames: int, period_ns: int) -> int:
    """How long a camera's lap lasts: its recorded span plus one of its mean frame periods, or
    plus ``period_ns`` when its frames give no period (one frame, or all stamped alike). A lap
    of 0 ns would stamp every lap alike, and a paced loop would release them all at once."""
    mean_ns = (last_ns - first_ns) // (frames - 1) if frames > 1 else 0
    return last_ns - first_ns + (mean_ns or period_ns)


class Schedule:
    """When each frame is due: ``start + (timestamp - first_timestamp) / speed``, the start
    being the moment the first frame was due; at once for ``speed=None``."""

    def __init__(self, pacing: Pacing, clock: Callable[[], float] = time.monotonic) -> None:
        self._speed = pacing.speed
        self._clock = clock
        self._start: tuple[float, int] | None = None  # (wall clock, timestamp_ns) of the first frame

    def wait(self, frame: SourceFrame, stop: threading.Event) -> bool:
        """Wait until ``frame`` is due; False (at once) if ``stop`` is set first."""
        if self._speed is not None:
            if self._start is None:
                self._start = (self._clock(), frame.timestamp_ns)
            wall, first_ts = self._start
            due = wall + (frame.timestamp_ns - first_ts) / 1e9 / self._speed
            wait = due - self._clock()
            if wait > 0 and stop.wait(wait):
                return False
        return not stop.is_set()


def paced(
    source: Iterable[SourceFrame],
    pacing: Pacing,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[SourceFrame]:
    """Yield the frames of ``source`` (re-iterated when looping) at their scheduled time; stop
    early once ``stop`` is set."""
    stop = stop or threading.Event()
    schedule = Schedule(pacing, clock)
    for frame in select(source, pacing):
        if not schedule.wait(frame, stop):
            return
        yield frame
