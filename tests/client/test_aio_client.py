"""The asyncio client against a real server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest

from client.aio_client import AsyncDetectorClient, AsyncStreamSession
from client.config import BackoffConfig, ClientConfig
from client.frames import FrameResult, FrameStatus, SourceFrame
from perception.errors import InvalidInputError, NotReadyError, PerceptionError
from tests.client import recordings as R
from tests.client.conftest import start_server
from tests.tiny_model import CLASSES


def _frames(n: int, cam: str) -> list[SourceFrame]:
    return [SourceFrame(cam, i, i * 10**8, encoded=R.jpeg(R.scene(i))) for i in range(n)]


def test_async_detect_and_two_concurrent_streams(server: str) -> None:
    async def run() -> dict[str, list[FrameResult]]:
        got: dict[str, list[FrameResult]] = {"left": [], "right": []}
        async with AsyncDetectorClient(ClientConfig(targets=(server,), window=2)) as client:
            info = await client.model_info()
            assert info.classes == CLASSES
            r = await client.detect(_frames(1, "left")[0])
            assert r.status is FrameStatus.OK and r.latency_ms > 0
            with pytest.raises(InvalidInputError):
                await client.detect(SourceFrame("left", 9, 0, encoded=b"junk"))

            async def camera(cam: str) -> None:
                async def on_result(frame: SourceFrame, result: FrameResult) -> None:
                    assert frame.sequence == result.sequence
                    got[cam].append(result)

                async with client.stream(on_result, name=cam) as s:
                    for f in _frames(8, cam):
                        await s.send(f)
                        assert s.in_flight <= 2

            await asyncio.gather(camera("left"), camera("right"))
        return got

    got = asyncio.run(run())
    for cam in ("left", "right"):
        assert [r.sequence for r in got[cam]] == list(range(8))
        assert all(r.status is FrameStatus.OK and r.camera_id == cam for r in got[cam])


def test_a_failing_on_result_ends_the_session_instead_of_hanging_send(server: str) -> None:
    """on_result raises (a full disk): the session ends with that error, and a sender waiting
    for room in the window raises it, where it used to wait for ever."""
    async def run() -> None:
        async with AsyncDetectorClient(ClientConfig(targets=(server,), window=1)) as client:
            def on_result(frame: SourceFrame, result: FrameResult) -> None:
                raise OSError("No space left on device")

            s = client.stream(on_result, name="full-disk")
            with pytest.raises(PerceptionError, match="handling an answer failed .*No space left"):
                for f in _frames(8, "full-disk"):
                    await asyncio.wait_for(s.send(f), timeout=10)
            await s.abort()

    asyncio.run(run())


def test_close_after_abort_raises_the_sessions_error_not_cancelled(server: str) -> None:
    """Cleanup code that always closes: after abort(), close() raised CancelledError, which
    ``except Exception`` does not catch and which took the caller's task down as if it had been
    cancelled. The sync session raises its error; so does this one now."""
    async def run() -> None:
        async with AsyncDetectorClient(ClientConfig(targets=(server,), window=2)) as client:
            s = client.stream(lambda f, r: None, name="aborted")
            await s.send(_frames(1, "aborted")[0])
            await s.abort()
            with pytest.raises(PerceptionError, match="aborted"):
                await s.close(5)
            await asyncio.sleep(0)  # the caller's task was not cancelled: it goes on

    asyncio.run(run())


def test_async_stream_gives_up_on_a_dead_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def run() -> None:
        cfg = ClientConfig(targets=(f"127.0.0.1:{port}",),
                           backoff=BackoffConfig(initial_s=0.01, max_s=0.02, max_attempts=2))
        async with AsyncDetectorClient(cfg) as client:
            s = client.stream(lambda f, r: None)
            await s.send(_frames(1, "x")[0])
            with pytest.raises(NotReadyError):
                await s.close(timeout=10)
            assert [f.sequence for f in s.lost] == [0] and s.reconnects == 2

    asyncio.run(run())


def test_async_stream_reconnects_and_resends_when_the_server_restarts(tiny_manifest: Path) -> None:
    srv, port = start_server(tiny_manifest)
    servers = [srv]

    def restart() -> None:
        servers[0].shutdown(0.0)  # gone mid-stream, in-flight calls cancelled
        time.sleep(0.3)
        servers.append(start_server(tiny_manifest, port=port)[0])

    async def run() -> tuple[list[int], AsyncStreamSession]:
        got: list[int] = []
        cfg = ClientConfig(targets=(f"127.0.0.1:{port}",), window=3,
                           backoff=BackoffConfig(initial_s=0.05, max_s=0.3, max_attempts=40))
        async with AsyncDetectorClient(cfg) as client:
            s = client.stream(lambda f, r: got.append(r.sequence))
            restarter = threading.Thread(target=restart)
            for i, f in enumerate(_frames(24, "front")):
                if i == 8:
                    restarter.start()
                await s.send(f)
                await asyncio.sleep(0.02)
            try:
                await s.close(timeout=10)  # a frame never re-sent would hang here
            finally:
                restarter.join()
        return got, s

    try:
        got, session = asyncio.run(run())
    finally:
        for s in servers:
            s.shutdown(0.0)
    assert session.reconnects >= 1, "the restart must actually have been crossed"
    assert got == list(range(24)), "every frame answered exactly once, in order"
    assert session.lost == [] and session.in_flight == 0


def test_a_stream_of_a_closed_client_raises_instead_of_hanging_send(server: str) -> None:
    """A client closed while a camera still sends: the session's connection attempt fails ("the
    client was closed") and ends the session, so that a sender waiting for room raises. Outside
    the session's error handling, it left the window open and send waited for ever."""
    async def run() -> None:
        client = AsyncDetectorClient(ClientConfig(targets=(server,), window=1))
        await client.close()
        session = client.stream(lambda frame, result: None, name="late")
        with pytest.raises(PerceptionError, match="closed"):
            for f in _frames(3, "late"):
                await asyncio.wait_for(session.send(f), 10)
        with pytest.raises(PerceptionError):
            await session.close(timeout=5)

    asyncio.run(run())


def test_one_client_on_two_event_loops_in_turn(server: str) -> None:
    """asyncio.run twice with one client: the second loop was handed the first loop's channels,
    and every call failed ("Event loop is closed"). Each loop gets channels of its own."""
    client = AsyncDetectorClient(ClientConfig(targets=(server,)))

    async def detect() -> FrameStatus:
        return (await client.detect(_frames(1, "left")[0])).status

    try:
        assert asyncio.run(detect()) is FrameStatus.OK
        assert asyncio.run(detect()) is FrameStatus.OK
    finally:
        asyncio.run(client.close())
