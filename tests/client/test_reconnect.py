"""A server that goes away in the middle of a replay and comes back on the same address."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.config import BackoffConfig, ClientConfig
from client.detector_client import DetectorClient
from client.frames import FrameStatus, SourceFrame
from client.pacing import Pacing
from client.replay import Replay, ReplayConfig
from tests.client import recordings as R
from tests.client.conftest import start_server


def test_replay_reconnects_when_the_server_restarts(tiny_manifest: Path) -> None:
    srv, port = start_server(tiny_manifest)
    jpegs = [R.jpeg(R.scene(i)) for i in range(4)]
    # Two cameras, 30 frames each at 40 fps: 0.75 s of recording, replayed in real time.
    frames = [
        SourceFrame(cam, i, R.T0_NS + i * 25_000_000 + k * 1_000_000, encoded=jpegs[i % 4])
        for i in range(30)
        for k, cam in enumerate(("front", "rear"))
    ]
    servers = [srv]

    def restart() -> None:
        time.sleep(0.25)
        servers[0].shutdown(0.0)  # gone mid-replay, in-flight calls cancelled
        time.sleep(0.3)
        servers.append(start_server(tiny_manifest, port=port)[0])

    cfg = ClientConfig(targets=(f"127.0.0.1:{port}",), window=2,
                       backoff=BackoffConfig(initial_s=0.05, max_s=0.3, max_attempts=40))
    t = threading.Thread(target=restart)
    try:
        with DetectorClient(cfg) as client:
            t.start()
            outcome = Replay(client, frames, ReplayConfig(pacing=Pacing(speed=1.0))).run()
        t.join()
    finally:
        for s in servers:
            s.shutdown(0.0)
    assert outcome.error is None
    assert outcome.stats.reconnects >= 1, "the restart must actually have been crossed"
    for cam in ("front", "rear"):
        seqs = [r.sequence for r in outcome.results if r.camera_id == cam]
        assert seqs == list(range(30)), "every frame answered exactly once, in order"
    assert outcome.stats.frames_sent == outcome.stats.frames_answered == 60 and outcome.stats.lost == 0
    assert sum(r.status is FrameStatus.OK for r in outcome.results) >= 50


def test_replay_cli_when_the_server_goes_away_for_good(tmp_path: Path, tiny_manifest: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from perception.cli import main

    srv, port = start_server(tiny_manifest)
    src = R.write_mp4(tmp_path / "front.mp4", n=40, fps=40.0)  # 1 s in real time
    out, summ = tmp_path / "o.jsonl", tmp_path / "s.json"
    killer = threading.Timer(0.4, srv.shutdown, args=(0.0,))
    killer.start()
    try:
        rc = main(["replay", str(src), "--server", f"127.0.0.1:{port}", "--out", str(out), "--json-out", str(summ),
                   "--reconnect-attempts", "2", "--no-progress"])
    finally:
        killer.join()
        srv.shutdown(0.0)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("perception replay: error: server 127.0.0.1:")
    lines = out.read_text().splitlines()
    recs = [json.loads(x) for x in lines]  # every line complete
    s = json.loads(summ.read_text())
    # Every frame of the source has a line: its answer, or a client-side status with a reason.
    assert len(recs) == 40 and 0 < s["frames_answered"] < 40
    assert s["frames_sent"] == s["frames_answered"] + s["dropped"].get("lost", 0)


def test_a_frame_over_the_servers_message_limit_is_recorded_not_sent_and_the_replay_goes_on(
        tiny_manifest: Path) -> None:
    """gRPC refuses a message over the server's limit at its length prefix and ends the stream.
    The replay asks the server for its limit (GetModelInfo) at the first big frame and does not
    send what would be refused: that frame gets a NOT_SENT line with the reason, the others
    their answers."""
    from client.frames import PixelFormat, RawPixels

    srv, port = start_server(tiny_manifest)
    raw_4k = RawPixels(3840, 2160, PixelFormat.BGR8, bytes(3840 * 2160 * 3))  # 24.9 MB; the server takes 8 MiB
    raw_small = RawPixels(640, 360, PixelFormat.BGR8, bytes(640 * 360 * 3))
    frames = [SourceFrame("front", 0, R.T0_NS, encoded=R.jpeg(R.scene(0))),
              SourceFrame("front", 1, R.T0_NS + 25_000_000, raw=raw_4k),
              SourceFrame("front", 2, R.T0_NS + 50_000_000, raw=raw_small),
              SourceFrame("front", 3, R.T0_NS + 75_000_000, encoded=R.jpeg(R.scene(1)))]
    cfg = ClientConfig(targets=(f"127.0.0.1:{port}",), window=2,
                       backoff=BackoffConfig(initial_s=0.05, max_s=0.3, max_attempts=40))
    try:
        with DetectorClient(cfg) as client:
            outcome = Replay(client, frames, ReplayConfig(pacing=Pacing(speed=None))).run()
    finally:
        srv.shutdown(0.0)
    assert outcome.error is None and outcome.stats.reconnects == 0
    assert [(r.sequence, r.status) for r in outcome.results] == [(0, FrameStatus.OK), (2, FrameStatus.OK),
                                                                (3, FrameStatus.OK)]
    assert [(u.sequence, u.status.value) for u in outcome.unanswered] == [(1, "NOT_SENT")]  # its own JSONL line
    assert "over the message limit of 8388608 bytes" in outcome.unanswered[0].reason


def test_a_stream_that_sends_a_frame_over_the_limit_gives_up_at_once_with_the_reason(tiny_manifest: Path) -> None:
    """Without the replay's check (a client of its own), the stream ends RESOURCE_EXHAUSTED
    ("Received message larger than max"). Sending the same frame again would fail the same way,
    so the session says why at once instead of reconnecting until its time runs out."""
    from client.frames import PixelFormat, RawPixels
    from perception.errors import InvalidInputError

    srv, port = start_server(tiny_manifest)
    raw_4k = RawPixels(3840, 2160, PixelFormat.BGR8, bytes(3840 * 2160 * 3))
    cfg = ClientConfig(targets=(f"127.0.0.1:{port}",), window=1,
                       backoff=BackoffConfig(initial_s=0.05, max_s=0.3, max_attempts=40))
    answers: list[int] = []
    t0 = time.monotonic()
    try:
        with DetectorClient(cfg) as client:
            session = client.stream(lambda frame, result: answers.append(frame.sequence))
            session.send(SourceFrame("front", 0, R.T0_NS, raw=raw_4k))
            with pytest.raises(InvalidInputError, match="larger than max.*--max-message-bytes"):
                session.close(10)
    finally:
        srv.shutdown(0.0)
    assert answers == [] and session.reconnects == 0 and time.monotonic() - t0 < 10


def test_frames_re_sent_after_a_reconnect_say_so() -> None:
    """The server's tracker tells a re-sent frame from a replay starting over by this mark
    (``Frame.resent``): a peer on loopback that drops the first stream after three frames, then
    answers everything, records what came on the wire."""
    from concurrent import futures

    import grpc

    from perception.v1 import detector_pb2 as pb

    seen: list[list[tuple[int, bool]]] = []

    def stream_detect(requests: Any, context: grpc.ServicerContext) -> Iterator[pb.DetectResponse]:
        calls: list[tuple[int, bool]] = []
        seen.append(calls)
        for req in requests:
            calls.append((req.frame.sequence, req.frame.resent))
            if len(seen) == 1 and len(calls) == 3:
                context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
            yield pb.DetectResponse(camera_id=req.frame.camera_id, sequence=req.frame.sequence,
                                    capture_timestamp_ns=req.frame.capture_timestamp_ns, status=pb.FRAME_STATUS_OK)

    handler = grpc.method_handlers_generic_handler("perception.v1.Detector", {
        "StreamDetect": grpc.stream_stream_rpc_method_handler(
            stream_detect, request_deserializer=pb.DetectRequest.FromString,
            response_serializer=pb.DetectResponse.SerializeToString)})
    peer = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    peer.add_generic_rpc_handlers((handler,))
    port = peer.add_insecure_port("127.0.0.1:0")
    peer.start()
    try:
        cfg = ClientConfig(targets=(f"127.0.0.1:{port}",), window=3,
                           backoff=BackoffConfig(initial_s=0.01, max_s=0.05, max_attempts=10))
        got: list[int] = []
        with DetectorClient(cfg) as client, client.stream(lambda f, r: got.append(r.sequence)) as session:
            for i in range(6):
                session.send(SourceFrame("front", i, R.T0_NS + i * 10**8, encoded=R.jpeg(R.scene(i))))
    finally:
        peer.stop(0)
    assert got == list(range(6))
    assert seen[0] == [(0, False), (1, False), (2, False)]  # 0 and 1 answered, then the stream dropped
    # Frame 2 (read, unanswered) and any sent behind it on the dropped stream come again first,
    # marked; the frames sent for the first time after them are not.
    flags = [resent for _, resent in seen[1]]
    assert [s for s, _ in seen[1]] == [2, 3, 4, 5] and flags[0], seen
    assert flags == sorted(flags, reverse=True) and not flags[-1], seen
