"""Faults of the camera node and its helpers that show only after long outages, at reopens,
with one-frame recordings or with a failing --out: the reconnect backoff past 1024 attempts,
capture times across a camera reopen, the pace of a looped single frame, and an --out that
cannot be written."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client import camera_node
from client.backoff import Backoff
from client.camera_stats import CameraStats
from client.capture_clock import CaptureClock
from client.config import BackoffConfig
from client.frames import SourceFrame
from client.live_capture import RecordingCamera
from client.pacing import Pacing, paced, select
from client.resend_window import Next, ResendWindow
from client.sources import SourceOptions, live_source
from perception.errors import DataError, NotReadyError
from tests.client import recordings as R

# Past 1024 attempts, where ``initial_s * 2.0**attempts`` overflows a float; tiny delays keep it quick.
MANY = 3000
TINY = BackoffConfig(initial_s=1e-7, max_s=1e-6, give_up_after_s=0.0, max_attempts=0)

# -- the backoff after 1024 attempts ---------------------------------------------------


def test_the_backoff_saturates_at_max_s_however_many_attempts() -> None:
    b = Backoff(TINY, random.Random(0))
    delays = [b.next_delay(now=float(i)) for i in range(MANY)]
    assert b.attempts == MANY
    assert all(d is not None and 0.5 * TINY.max_s <= d <= TINY.max_s for d in delays[10:]), "capped at max_s"
    b.reset()
    first = b.next_delay()
    assert first is not None and first <= TINY.initial_s, "a reset starts the growth over"


def test_a_session_retrying_for_ever_reconnects_past_1024_failures() -> None:
    """``--reconnect-timeout 0``: the receiver used to fail with OverflowError after ~85 min."""
    w = ResendWindow(2, Backoff(TINY, random.Random(0)), name="cam")
    w.accept(SourceFrame("front", 0, 0, encoded=b"\xff\xd8"))
    g = w.begin_connection()
    assert g is not None and w.take(g, 0.0) is not None
    for i in range(MANY):
        decision = w.after_failure(NotReadyError("server a:1 unavailable"), True, now=float(i))
        assert decision.next is Next.RECONNECT and decision.delay_s <= TINY.max_s
    assert w.reconnects == MANY and w.error is None


class _Unplugged:
    """A camera that never opens; it stops the node after ``opens`` attempts."""

    name = "/dev/video9"

    def __init__(self, opens: int, stop: threading.Event) -> None:
        self.opens, self._left, self._stop = 0, opens, stop

    def open(self) -> None:
        self.opens += 1
        if self.opens == self._left:
            self._stop.set()
        raise DataError("/dev/video9: no such video device")

    def read(self) -> None:
        raise AssertionError("never opened")

    def close(self) -> None:
        pass


def test_the_capture_thread_outlives_1024_failed_opens() -> None:
    """A camera unplugged for ~3 h (1024 attempts at the 10 s maximum) used to kill the capture
    thread, and the node went on reporting the camera down for ever."""
    stop = threading.Event()
    camera = _Unplugged(MANY, stop)
    worker: Any = object.__new__(camera_node.CameraWorker)  # only the capture loop's parts
    worker.camera_id = "front"
    worker.stats = CameraStats("front", camera.name)
    worker._camera, worker._stop, worker._retry = camera, stop, TINY
    worker._capture_loop()  # returns once stopped
    assert camera.opens == MANY and worker.stats.open_failures == MANY


# -- capture time across a camera reopen -----------------------------------------------


def _host_clock(mono: list[int]) -> dict[str, Any]:
    return {"monotonic_ns": lambda: mono[0], "epoch_ns": lambda: 10**18 + mono[0]}


def test_a_reconnect_maps_the_new_stream_clock_and_never_stamps_backwards() -> None:
    mono = [5 * 10**9]
    clock = CaptureClock(**_host_clock(mono))
    host = clock.host_now()
    clock.stamp(0.0)  # the first frame: no stream time yet, the host's
    for ms in (40.0, 500.0, 940.0):  # frames read in a burst: the stream clock runs 0.9 s ahead
        last = clock.stamp(ms)
    assert last == host + 900_000_000 and clock.uses_stream_clock
    mono[0] += 100_000_000
    clock.reconnected()  # the new stream's clock starts again at 0
    first = clock.stamp(0.0)
    assert first > last, "not before the last frame of the connection before"
    mono[0] += 1_000_000_000  # the new stream's clock is mapped and believed
    second = clock.stamp(1000.0)
    assert second - first == 900_000_000 and clock.uses_stream_clock  # behind the stamps: 0.9 of its 1 s
    ms = 1000.0
    for _ in range(300):  # 40 ms frames: the stamps meet the new clock (host + 1.1 s at 1000 ms)
        mono[0] += 40_000_000
        ms += 40.0
        stamped = clock.stamp(ms)
    assert stamped == host + 1_100_000_000 + int((ms - 1000.0) * 1e6)


def test_frames_stamped_behind_the_last_keep_their_spacing() -> None:
    """A stream clock 0.9 s ahead of the host's, then a reconnect whose new clock starts at the
    host's: until it caught up, every frame was stamped 1 ns after the last, a second of frames
    on one instant (a tracker saw a car stand still, then jump: 4 ids for one car). They keep
    0.9 of their spacing now, and meet the new clock within ten times the lead."""
    mono = [5 * 10**9]
    clock = CaptureClock(**_host_clock(mono))
    clock.stamp(0.0)
    pos = 0.0
    for _ in range(30):  # read in a burst at connect: the stream clock runs ahead
        mono[0] += 3_000_000
        pos += 33.333333
        last = clock.stamp(pos)
    assert last - clock.host_now() > 800_000_000 and clock.uses_stream_clock
    mono[0] += 100_000_000
    clock.reconnected()
    stamps, pos = [last], 0.0
    for _ in range(400):  # 13 s at 30 fps on the new connection
        mono[0] += 33_333_333
        stamps.append(clock.stamp(pos))
        pos += 33.333333
    gaps = [b - a for a, b in itertools.pairwise(stamps[2:])]
    assert min(gaps) >= 0.9 * 33_333_333 - 1, min(gaps)
    assert stamps[-1] == clock.host_now(), "caught up with the new clock"


class _FakeStream:
    """cv2.VideoCapture of a network stream whose clock (CAP_PROP_POS_MSEC) restarts at 0 on
    every connection and runs ahead of the host: frames are read in a burst."""

    def __init__(self, *_: Any) -> None:
        self._ms = iter([0.0, 40.0, 500.0, 940.0])
        self._now = 0.0

    def isOpened(self) -> bool:  # noqa: N802 (OpenCV's name)
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        self._now = next(self._ms, -1.0)
        return (self._now >= 0, np.zeros((4, 4, 3), np.uint8) if self._now >= 0 else None)

    def get(self, prop: int) -> float:
        assert prop == live_source.cv2.CAP_PROP_POS_MSEC
        return self._now

    def release(self) -> None:
        pass


def test_a_reopened_live_camera_keeps_its_capture_times_increasing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's tracker takes a capture time going backwards for a camera restart and drops
    every track of that camera: a quick reopen after a stream clock ahead of the host did that."""
    mono = [5 * 10**9]
    monkeypatch.setattr(live_source.cv2, "VideoCapture", _FakeStream)
    monkeypatch.setattr(live_source, "_check_connect", lambda target: None)  # the stream stands in for a camera
    monkeypatch.setattr(live_source, "CaptureClock", lambda: CaptureClock(**_host_clock(mono)))
    cap = live_source.LiveCapture(live_source.LiveTarget(live_source.LiveKind.STREAM, "rtsp://cam.local/front"))
    stamps = []
    for _ in range(2):  # the stream ends, the camera is reopened 50 ms later
        cap.open()
        while (got := cap.read()) is not None:
            stamps.append(got[1])
        cap.close()
        mono[0] += 50_000_000
    assert len(stamps) == 8
    assert all(b > a for a, b in zip(stamps, stamps[1:], strict=False)), [s - stamps[0] for s in stamps]


# -- a looped one-frame recording --------------------------------------------------------


def _one_frame(n: int = 1) -> list[SourceFrame]:
    return [SourceFrame("front", i, 10**18, encoded=b"\xff\xd8x") for i in range(n)]


class _Video:
    """A one-frame source that states its frame rate, as a video does."""

    fps = 25.0

    def __iter__(self) -> Iterator[SourceFrame]:
        return iter(_one_frame())


def _stamp_steps(source: Any, pacing: Pacing) -> list[int]:
    ts = [f.timestamp_ns for f in select(source, pacing)]
    return [b - a for a, b in zip(ts, ts[1:], strict=False)]


def test_a_looped_single_frame_lasts_one_frame_period() -> None:
    looped = Pacing(speed=None, loop=True, max_frames=4)
    at_4_fps = dataclasses.replace(looped, fps=4.0)
    assert _stamp_steps(_one_frame(), looped) == [100_000_000] * 3, "the default 10 fps"
    assert _stamp_steps(_one_frame(), at_4_fps) == [250_000_000] * 3, "the fps given"
    assert _stamp_steps(_Video(), at_4_fps) == [40_000_000] * 3, "the source's own rate first"
    steps = _stamp_steps(_one_frame(3), Pacing(speed=None, loop=True, max_frames=9))
    assert steps == [0, 0, 100_000_000] * 2 + [0, 0], "frames all stamped alike: one period a lap"
    t0 = time.monotonic()
    assert len(list(paced(_one_frame(), Pacing(speed=1.0, loop=True, max_frames=4)))) == 4
    assert time.monotonic() - t0 >= 0.29, "replay --loop of one frame is paced, not sent flat out"


def test_a_one_image_folder_as_a_camera_captures_at_its_frame_rate(tmp_path: Path) -> None:
    """It used to "capture" ~11k frames/s, spinning a core."""
    camera = RecordingCamera(R.write_folder(tmp_path / "still", n=1), SourceOptions())
    camera.open()
    t0 = time.monotonic()
    grabs = [camera.read() for _ in range(4)]
    elapsed = time.monotonic() - t0
    camera.close()
    assert all(g is not None for g in grabs)
    assert elapsed >= 0.29, f"4 frames at 10 fps take 0.3 s, not {elapsed:.3f} s"


# -- perception camera --out that cannot be written ----------------------------------------


def test_an_out_that_cannot_be_written_stops_the_node_with_an_error(
    server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out /dev/full: the node used to log a traceback per answer, run to the end and exit 0."""
    from perception.cli import main

    caplog.set_level(logging.INFO, logger="client")
    video = R.write_mp4(tmp_path / "dashcam.mp4", n=6, fps=20.0)
    t0 = time.monotonic()
    rc = main(["camera", str(video), "--loop", "--server", server, "--out", "/dev/full", "--duration", "20"])
    elapsed = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert rc == 1
    assert "perception camera: error: writing answers failed, the node stopped: /dev/full: cannot write" in err
    assert elapsed < 15, "stopped at the first failed write, not at --duration"
    assert "dashcam: " in out, "the summary is printed all the same"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "/dev/full" in errors[0].getMessage() and errors[0].exc_info is None, errors
