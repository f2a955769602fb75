"""The sync client library against a real server: unary Detect, StreamDetect with a bounded
window, invalid frames, round-robin over several servers."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

from client.config import BackoffConfig, ClientConfig
from client.convert import RequestOptions
from client.detector_client import DetectorClient
from client.frames import FrameResult, FrameStatus, SourceFrame
from client.sources.images import bgr_frame
from perception.errors import InvalidInputError, NotReadyError
from tests.client import recordings as R
from tests.client.conftest import start_server
from tests.tiny_model import CLASSES


def _frames(n: int, camera: str = "front") -> list[SourceFrame]:
    return [SourceFrame(camera, i, R.T0_NS + i * 10**8, encoded=R.jpeg(R.scene(i))) for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_detect_and_model_info(server: str) -> None:
    with DetectorClient(ClientConfig(targets=(server,))) as client:
        info = client.model_info()
        assert info.classes == CLASSES and (info.input_width, info.input_height) == (64, 48)
        r = client.detect(_frames(1)[0])
        assert r.status is FrameStatus.OK and (r.image_width, r.image_height) == (96, 64) and r.latency_ms > 0
        raw = client.detect(bgr_frame("front", 1, 0, R.scene(0)))
        assert raw.status is FrameStatus.OK and len(raw.detections) > 0
        few = client.detect(_frames(1)[0], RequestOptions(max_detections=2, class_filter=(0,)))
        assert len(few.detections) <= 2 and set(few.detections.class_ids.tolist()) <= {0}
        with pytest.raises(InvalidInputError):
            client.detect(SourceFrame("front", 2, 0, encoded=b"\xff\xd8garbage"))


def test_stream_window_order_and_invalid_frame(server: str) -> None:
    frames = _frames(12)
    frames[5] = SourceFrame("front", 5, frames[5].timestamp_ns, encoded=b"not an image")
    got: list[tuple[SourceFrame, FrameResult]] = []
    peak = 0
    with DetectorClient(ClientConfig(targets=(server,), window=2)) as client:
        session = client.stream(lambda f, r: got.append((f, r)))
        with session:
            for f in frames:
                session.send(f)
                peak = max(peak, session.in_flight)
                assert session.in_flight <= 2
    assert [r.sequence for _, r in got] == list(range(12))
    assert all(f.sequence == r.sequence for f, r in got), "each answer is delivered with its own frame"
    assert got[5][1].status is FrameStatus.INVALID and got[5][1].message
    assert all(r.status is FrameStatus.OK for i, (_, r) in enumerate(got) if i != 5)
    assert peak == 2


def test_what_the_wire_cannot_carry_is_refused_where_the_frame_is_made() -> None:
    """A sequence or raw size the wire's unsigned fields cannot hold failed while the stream
    built its request: the call was cancelled, and the frame, re-sent first, ended every
    reconnect until the session gave up. It is refused when the frame is made."""
    from client.frames import RawPixels
    from perception.decode import PixelFormat

    for bad in (lambda: SourceFrame("front", -1, 0, encoded=b"x"),
                lambda: SourceFrame("front", 1 << 64, 0, encoded=b"x"),
                # A folder name in another encoding (os.fsdecode keeps its bytes as surrogates):
                # protobuf cannot encode it, and every reconnect re-sent it for 120 s.
                lambda: SourceFrame("cam\udcff", 0, 0, encoded=b"x"),
                lambda: SourceFrame("c" * 129, 0, 0, encoded=b"x"),  # longer than a server takes
                lambda: RawPixels(-4, 4, PixelFormat.BGR8, b"")):
        with pytest.raises(InvalidInputError):
            bad()
    with pytest.raises(Exception, match="deadline_ms"):
        ClientConfig(targets=("127.0.0.1:1",), deadline_ms=1 << 32)


def test_a_session_whose_channel_closes_under_it_ends_with_an_error(server: str) -> None:
    """The client closed while a session is open: the receiver met an error that is no gRPC
    error and its thread ended silently, leaving senders blocked and frames in no count. The
    session now ends with an error: sends raise, close raises, the frames in flight are lost."""
    from perception.errors import PerceptionError

    client = DetectorClient(ClientConfig(targets=(server,), window=2))
    got: list[FrameResult] = []
    session = client.stream(lambda f, r: got.append(r))
    frames = _frames(3)
    session.send(frames[0])
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    assert got, "the first frame was answered"
    client.close()
    with pytest.raises(PerceptionError):
        for f in frames[1:] * 20:  # a sender is never left blocked: one of these raises
            session.send(f, timeout=5)
        session.close(timeout=10)
    assert session.join(10)


def test_send_blocks_while_the_window_is_full() -> None:
    # Nobody answers (the server is not there yet), so the window of 2 fills and stays full.
    cfg = ClientConfig(targets=(f"127.0.0.1:{_free_port()}",), window=2,
                       backoff=BackoffConfig(initial_s=2.0, max_s=2.0, max_attempts=0))
    with DetectorClient(cfg) as client:
        session = client.stream(lambda f, r: None)
        frames = _frames(3)
        assert session.send(frames[0], timeout=0.5) and session.send(frames[1], timeout=0.5)
        assert not session.send(frames[2], timeout=0.3)
        assert session.in_flight == 2
        session.abort()
        assert sorted(f.sequence for f in session.lost) == [0, 1]


def test_round_robin_over_servers_and_failover(tiny_manifest: Path, server: str) -> None:
    srv2, port2 = start_server(tiny_manifest)
    try:
        second = f"127.0.0.1:{port2}"
        cfg = ClientConfig(targets=(server, second))
        with DetectorClient(cfg) as client:
            got: list[FrameResult] = []
            sessions = [client.stream(lambda f, r: got.append(r), name=c) for c in ("a", "b", "c", "d")]
            for s, cam in zip(sessions, "abcd", strict=True):
                for f in _frames(2, camera=cam):
                    s.send(f)
            for s in sessions:
                s.close(timeout=10)
            # Each session connects at its first frame, on its own thread: in whichever order
            # those threads get there, the four connections alternate between the two servers.
            assert sorted(s.address for s in sessions) == sorted([server, second, server, second])
            assert len(got) == 8
    finally:
        srv2.shutdown(0.5)
    # A dead address in the list is skipped: unary calls move on to the next server.
    dead = f"127.0.0.1:{_free_port()}"
    cfg = ClientConfig(targets=(dead, server), backoff=BackoffConfig(initial_s=0.01, max_attempts=3))
    with DetectorClient(cfg) as client:
        for f in _frames(3):
            assert client.detect(f).status is FrameStatus.OK


def test_stream_gives_up_on_a_dead_server() -> None:
    cfg = ClientConfig(targets=(f"127.0.0.1:{_free_port()}",),
                       backoff=BackoffConfig(initial_s=0.01, max_s=0.02, max_attempts=2))
    with DetectorClient(cfg) as client:
        session = client.stream(lambda f, r: None)
        session.send(_frames(1)[0])
        with pytest.raises(NotReadyError, match="UNAVAILABLE"):
            session.close(timeout=10)
        assert [f.sequence for f in session.lost] == [0]
        # The bound counts the 2 reconnects with the frame waiting; the session connects only
        # once it has the frame, so it made no idle attempt before.
        assert session.reconnects == 2


def test_an_idle_session_never_gives_up_on_the_attempt_bound() -> None:
    """With max_attempts set, drops of a session with nothing in flight (a server ending a quiet
    stream, or down while the camera is) counted towards the bound, and the session gave up
    with no frame to give up on; later sends raised. A session with nothing to send now makes
    no attempt at all (it holds no call), so it has nothing to give up on."""
    cfg = ClientConfig(targets=(f"127.0.0.1:{_free_port()}",),
                       backoff=BackoffConfig(initial_s=0.01, max_s=0.02, max_attempts=2))
    with DetectorClient(cfg) as client:
        session = client.stream(lambda f, r: None)
        time.sleep(0.5)  # long enough for dozens of attempts at these delays
        assert session.reconnects == 0 and session.error is None, "the idle session tried to connect"
        assert session.send(_frames(1)[0], timeout=1), "the session gave up while idle"
        session.abort()


def test_per_frame_deadline_is_sent_and_enforced(server: str) -> None:
    # Decoding a 1920x1080 noise JPEG alone takes ~13 ms here: a 1 ms deadline cannot be met.
    noise = np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
    data = R.jpeg(noise)
    with DetectorClient(ClientConfig(targets=(server,), deadline_ms=1)) as client:
        assert client.detect(SourceFrame("front", 0, 0, encoded=data)).status is FrameStatus.EXPIRED
        got: list[FrameResult] = []
        with client.stream(lambda f, r: got.append(r)) as s:
            s.send(SourceFrame("front", 1, 0, encoded=data))
        assert got[0].status is FrameStatus.EXPIRED and got[0].message
    with DetectorClient(ClientConfig(targets=(server,), deadline_ms=10_000)) as client:
        assert client.detect(SourceFrame("front", 2, 0, encoded=data)).status is FrameStatus.OK
