"""A session holds one of the server's stream slots only while it has frames to send: the
StreamDetect call opens at the first frame, a quiet session closes it on its own (not counted
as a failure or a reconnect) and the next frame opens it again. Real server on loopback."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from client.aio_client import AsyncDetectorClient
from client.config import ClientConfig
from client.detector_client import DetectorClient
from client.frames import FrameResult, FrameStatus, SourceFrame
from tests.client import recordings as R
from tests.client.conftest import start_server


def _frames(n: int, camera: str = "front") -> list[SourceFrame]:
    return [SourceFrame(camera, i, R.T0_NS + i * 10**8, encoded=R.jpeg(R.scene(i))) for i in range(n)]


def _open_streams(srv: Any) -> int:
    return int(srv.limits.streams.open_streams)


def _eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def _stays(check: Callable[[], bool], for_s: float) -> bool:
    end = time.monotonic() + for_s
    while time.monotonic() < end:
        if not check():
            return False
        time.sleep(0.02)
    return True


def test_a_sync_session_holds_a_stream_slot_only_while_it_has_frames(
    tiny_manifest: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The call was opened when the session was made: a camera with nothing to send took a
    slot until the server's idle timeout, then reconnected and took it again."""
    srv, port = start_server(tiny_manifest)  # the server's idle timeout (60 s) never comes into play
    got: list[FrameResult] = []
    answered = threading.Event()

    def on_result(frame: SourceFrame, result: FrameResult) -> None:
        got.append(result)
        answered.set()

    frames = _frames(2)
    try:
        with DetectorClient(ClientConfig(targets=(f"127.0.0.1:{port}",), idle_close_s=0.5)) as client:
            session = client.stream(on_result, name="quiet")
            assert _stays(lambda: _open_streams(srv) == 0, 1.0), "a session with nothing to send took a slot"
            caplog.set_level(logging.DEBUG, logger="client.stream")
            for f in frames:
                answered.clear()
                assert session.send(f, timeout=5)
                assert answered.wait(10), "the first frame opens the call"
                assert _eventually(lambda: _open_streams(srv) == 0), "the quiet session kept its slot"
                assert _stays(lambda: _open_streams(srv) == 0, 0.5), "the quiet session opened a call again"
            session.close(timeout=10)
    finally:
        srv.shutdown(0.5)
    assert [r.sequence for r in got] == [0, 1] and all(r.status is FrameStatus.OK for r in got)
    assert session.reconnects == 0 and session.error is None, "its own idle close is no failure"
    news = [r for r in caplog.records if r.name.startswith("client.") and r.levelno >= logging.WARNING]
    assert not news, "its own idle close is not news"


def test_an_async_session_holds_a_stream_slot_only_while_it_has_frames(tiny_manifest: Path) -> None:
    srv, port = start_server(tiny_manifest)

    async def run() -> tuple[list[int], int]:
        got: list[int] = []
        cfg = ClientConfig(targets=(f"127.0.0.1:{port}",), idle_close_s=0.5)
        async with AsyncDetectorClient(cfg) as client, client.stream(lambda f, r: got.append(r.sequence)) as s:
            await asyncio.sleep(1.0)
            assert _open_streams(srv) == 0, "a session with nothing to send took a slot"
            for f in _frames(2):
                await s.send(f)
                end = time.monotonic() + 10
                while _open_streams(srv) or len(got) <= f.sequence:
                    assert time.monotonic() < end, "the frame was not answered, or the quiet session kept its slot"
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.5)
                assert _open_streams(srv) == 0, "the quiet session opened a call again"
        return got, s.reconnects

    try:
        got, reconnects = asyncio.run(run())
    finally:
        srv.shutdown(0.5)
    assert got == [0, 1] and reconnects == 0


def test_a_stream_the_server_ended_as_idle_is_opened_again_only_for_a_frame(
    tiny_manifest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server whose idle timeout is shorter than the client's: it ends the quiet call, and the
    session used to reconnect at once, taking the slot again for nothing, over and over. An end
    with nothing in flight lost nothing: no reconnect is counted and nothing is logged as news."""
    caplog.set_level(logging.INFO)
    srv, port = start_server(tiny_manifest, stream_idle_timeout_s=0.3)
    got: list[int] = []
    frames = _frames(2)
    try:
        with DetectorClient(ClientConfig(targets=(f"127.0.0.1:{port}",), idle_close_s=60.0)) as client:
            session = client.stream(lambda f, r: got.append(r.sequence))
            session.send(frames[0])
            assert _eventually(lambda: got == [0])
            assert _eventually(lambda: _open_streams(srv) == 0), "the server ended the quiet stream"
            assert _stays(lambda: _open_streams(srv) == 0, 1.5), "the session reconnected with nothing to send"
            session.send(frames[1])
            session.close(timeout=10)
    finally:
        srv.shutdown(0.5)
    assert got == [0, 1] and session.lost == []
    assert session.reconnects == 0, "the server's idle end, with nothing in flight, is no failure"
    news = [r for r in caplog.records if r.name.startswith("client.") and r.levelno >= logging.WARNING]
    assert news == [], [r.getMessage() for r in news]
