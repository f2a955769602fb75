"""Replay timing: recorded time with a speed factor, max rate, skip, loop."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from client.frames import SourceFrame
from client.pacing import Pacing, paced
from perception.errors import ConfigError


def _frames(cams: tuple[str, ...] = ("a", "b"), n: int = 5, period_ms: int = 40) -> list[SourceFrame]:
    out = []
    for i in range(n):
        for k, c in enumerate(cams):
            out.append(SourceFrame(c, i, 10**18 + i * period_ms * 10**6 + k * 10**6, encoded=b"\xff\xd8x"))
    return out


def test_real_time_follows_recorded_timestamps() -> None:
    frames = _frames(n=6, period_ms=40)  # 200 ms of recording
    t0 = time.monotonic()
    released = []
    for f in paced(frames, Pacing(speed=1.0)):
        released.append((time.monotonic() - t0, f))
    elapsed = released[-1][0]
    assert 0.19 <= elapsed < 0.6
    # Each frame leaves no earlier than its recorded offset.
    for when, f in released:
        assert when >= (f.timestamp_ns - frames[0].timestamp_ns) / 1e9 - 0.005


def test_speed_factor_and_max_rate() -> None:
    frames = _frames(n=6, period_ms=40)
    t0 = time.monotonic()
    list(paced(frames, Pacing(speed=4.0)))
    fast = time.monotonic() - t0
    assert 0.045 <= fast < 0.3  # 201 ms / 4
    t0 = time.monotonic()
    assert len(list(paced(frames, Pacing(speed=None)))) == 12
    assert time.monotonic() - t0 < 0.04


def test_skip_keeps_recorded_sequence_numbers() -> None:
    out = list(paced(_frames(cams=("a",), n=7), Pacing(speed=None, skip=2)))
    assert [f.sequence for f in out] == [0, 3, 6]


def test_loop_keeps_sequences_and_timestamps_increasing() -> None:
    out = list(paced(_frames(n=3), Pacing(speed=None, loop=True, max_frames=14)))
    assert len(out) == 14
    a = [f for f in out if f.camera_id == "a"]
    assert [f.sequence for f in a] == list(range(7))
    ts = [f.timestamp_ns for f in a]
    assert all(t2 - t1 == 40_000_000 for t1, t2 in itertools.pairwise(ts))


def test_stop_event_interrupts_a_wait() -> None:
    frames = [SourceFrame("a", 0, 0, encoded=b"x"), SourceFrame("a", 1, 10 * 10**9, encoded=b"x")]
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    t0 = time.monotonic()
    assert len(list(paced(frames, Pacing(speed=1.0), stop))) == 1
    assert time.monotonic() - t0 < 1.0


def test_invalid_pacing() -> None:
    with pytest.raises(ConfigError):
        Pacing(speed=0.0)
    with pytest.raises(ConfigError):
        Pacing(skip=-1)
