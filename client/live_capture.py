"""What a camera node captures from: a live camera, or a recording looped as a fake one.

A ``Camera`` is opened, read (``read()`` gives the next ``Grab`` or None when the camera is
gone) and closed; the node reopens it with backoff after a loss. A ``Grab`` keeps the decoded
image and leaves encoding to the sender, so frames dropped for the newer one cost no
JPEG encoding.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from client.capture_clock import CaptureClock
from client.frames import SourceFrame
from client.pacing import Pacing, select
from client.sources import SourceOptions, open_source
from client.sources.base import FrameSource
from client.sources.live_source import CaptureRequest, LiveCapture, LiveTarget
from perception.errors import ConfigError, DataError


@dataclass(frozen=True)
class Grab:
    """One captured frame: a decoded (H, W, 3) uint8 BGR ``image``, or a recorded ``frame``
    sent as recorded (compressed or raw); ``timestamp_ns`` = capture time, epoch ns."""

    timestamp_ns: int
    image: NDArray[np.uint8] | None = None
    frame: SourceFrame | None = None


class Camera(Protocol):
    name: str

    def open(self) -> None:
        """Connect; raises DataError (worth retrying) or ConfigError (not)."""
        ...

    def read(self) -> Grab | None:
        """The next frame; None when the camera is gone."""
        ...

    def close(self) -> None: ...


class LiveCamera:
    """A V4L2 device, network stream or GStreamer pipeline."""

    def __init__(self, target: LiveTarget, request: CaptureRequest) -> None:
        self.name = target.shown  # logged and in the summary: no credentials
        self._capture = LiveCapture(target, request)

    def open(self) -> None:
        self._capture.open()

    def read(self) -> Grab | None:
        got = self._capture.read()
        return None if got is None else Grab(got[1], image=got[0])

    def close(self) -> None:
        self._capture.close()


def camera_count(source: FrameSource) -> int:
    """How many cameras a recording holds (1 when the reader does not say)."""
    for attr in ("cameras", "topics", "videos"):
        value = getattr(source, attr, None)
        if value:
            return len(value)
    return 1


class RecordingCamera:
    """A single-camera recording played in real time, over and over: a fake live camera.

    Frames go as recorded (JPEG stays JPEG, raw stays raw); their capture time is the host's
    clock when they are released.
    """

    def __init__(self, path: Path, options: SourceOptions) -> None:
        self.name = str(path)
        self._source = open_source(path, options)
        self._fps = options.fps
        n = camera_count(self._source)
        if n != 1:
            raise ConfigError(f"{path}: holds {n} cameras; a looped recording stands in for one camera "
                              "(give one video, one flat image folder, or one topic with --topic)")
        self._frames: Iterator[SourceFrame] | None = None
        self._clock = CaptureClock()
        self._start = 0.0
        self._first_ns = 0

    def open(self) -> None:
        self._frames = select(self._source, Pacing(speed=1.0, loop=True, fps=self._fps))
        self._start = time.monotonic()
        self._first_ns = -1

    def read(self) -> Grab | None:
        if self._frames is None:
            return None
        try:
            frame = next(self._frames)
        except StopIteration:
            return None
        except DataError:
            self._frames = None
            raise
        if self._first_ns < 0:
            self._first_ns = frame.timestamp_ns
        due = self._start + (frame.timestamp_ns - self._first_ns) / 1e9
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return Grab(self._clock.host_now(), frame=dataclasses.replace(frame, file_name=""))

    def close(self) -> None:
        self._frames = None
