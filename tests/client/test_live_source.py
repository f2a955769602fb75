"""Live sources outside the camera node: which arguments name a live camera, the capture clock,
the newest-frame mailbox, and `perception replay` of a live URL (no longer taken for a path)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from client.capture_clock import CaptureClock
from client.latest_frame import LatestFrame
from client.sources import open_source
from client.sources.live_source import LiveKind, LiveSource, LiveTarget, live_target
from perception.errors import DataError
from tests.client.mjpeg_server import MjpegCamera


@pytest.mark.parametrize(
    ("given", "kind", "location", "camera_id"),
    [
        ("rtsp://cam.local:8554/front", LiveKind.STREAM, "rtsp://cam.local:8554/front", "front"),
        ("http://user:pw@10.0.0.5:8080/", LiveKind.STREAM, "http://user:pw@10.0.0.5:8080/", "10.0.0.5_8080"),
        ("https://cam/stream/rear.mjpg?fps=10", LiveKind.STREAM, "https://cam/stream/rear.mjpg?fps=10", "rear"),
        ("/dev/video0", LiveKind.V4L2, "/dev/video0", "video0"),
        ("v4l2src ! videoconvert ! appsink", LiveKind.GSTREAMER, "v4l2src ! videoconvert ! appsink", "gstreamer"),
    ],
)
def test_live_targets(given: str | Path, kind: LiveKind, location: str, camera_id: str) -> None:
    target = live_target(given)
    assert target == LiveTarget(kind, location)
    assert target.default_camera_id() == camera_id


def test_recordings_are_not_live() -> None:
    # A URL through pathlib has lost a slash ("rtsp:/host/x.mp4"): that is a file name, not a camera.
    assert live_target(Path("rtsp://host/x.mp4")) is None
    assert live_target(Path("drive/front.mp4")) is None
    assert live_target("recordings/a.mcap") is None


def test_capture_clock_uses_the_stream_clock_while_it_keeps_pace() -> None:
    mono = [5_000_000_000]
    clock = CaptureClock(max_drift_ns=100_000_000, monotonic_ns=lambda: mono[0], epoch_ns=lambda: 10**18 + mono[0])
    assert clock.stamp(0.0) == 10**18 + 5_000_000_000  # first frame stamped 0: host time
    mono[0] += 40_000_000
    first = clock.stamp(1000.0)  # mapped once here
    mono[0] += 45_000_000  # read 5 ms late: the stream's 40 ms is the truth
    assert clock.stamp(1040.0) == first + 40_000_000 and clock.uses_stream_clock
    mono[0] += 500_000_000  # stream says 40 ms, host says 500 ms: an invented clock
    late = clock.stamp(1080.0)
    assert not clock.uses_stream_clock and late == clock.host_now()
    mono[0] += 10_000_000
    assert clock.stamp(5000.0) == clock.host_now(), "the host clock from now on"


def test_capture_clock_never_goes_backwards_when_it_drops_a_fast_stream_clock() -> None:
    mono = [0]
    clock = CaptureClock(max_drift_ns=100_000_000, monotonic_ns=lambda: mono[0], epoch_ns=lambda: 10**18 + mono[0])
    stamps = [clock.stamp(0.0)]
    for i in range(1, 6):
        mono[0] += 10_000_000
        stamps.append(clock.stamp(i * 80.0))  # runs 8x faster than the host
    assert not clock.uses_stream_clock
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


def test_latest_frame_keeps_only_the_newest() -> None:
    slot: LatestFrame[int] = LatestFrame()
    room = threading.Event()
    for i in range(5):
        slot.put(i)
    assert slot.take(room.is_set, timeout=0.05) is None, "no room in the window: nothing taken"

    def make_room() -> None:
        room.set()
        slot.poke()

    threading.Timer(0.05, make_room).start()
    assert slot.take(room.is_set, timeout=2.0) == 4
    assert slot.overwritten == 4
    assert slot.take(room.is_set, timeout=0.05) is None, "taken once"


def test_open_source_reads_an_http_url() -> None:
    cam = MjpegCamera(fps=50.0)
    try:
        source = open_source(cam.url("front.mjpg"))
        assert isinstance(source, LiveSource) and source.location == cam.url("front.mjpg")
        frames = []
        for f in source:
            frames.append(f)
            if len(frames) == 3:
                break
    finally:
        cam.stop()
    assert [f.sequence for f in frames] == [0, 1, 2] and {f.camera_id for f in frames} == {"front"}
    assert frames[0].raw is not None and (frames[0].raw.width, frames[0].raw.height) == (96, 64)


def test_unreachable_live_sources_fail_with_their_real_name() -> None:
    with pytest.raises(DataError, match=r"^rtsp://127\.0\.0\.1:1/stream: cannot open network stream"):
        open_source("rtsp://127.0.0.1:1/stream")
    with pytest.raises(DataError, match="/dev/video99: no such video device"):
        open_source("/dev/video99")


def test_replay_cli_accepts_an_http_url(server: str, tmp_path: Path) -> None:
    from perception.cli import main

    cam = MjpegCamera(fps=50.0)
    out = tmp_path / "o.jsonl"
    try:
        rc = main(["replay", cam.url("front.mjpg"), "--server", server, "--max-frames", "6", "--out", str(out),
                   "--no-progress", "--encode", "jpeg"])
    finally:
        cam.stop()
    assert rc == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["sequence"] for r in recs] == list(range(6)) and {r["camera_id"] for r in recs} == {"front"}
    assert all(r["status"] == "OK" for r in recs)


def test_a_live_replay_that_gives_up_on_the_server_ends(tiny_manifest: Path, tmp_path: Path) -> None:
    """A replay of a live camera whose server goes away for good ends once it gives up, with a
    line for each frame it read. A recording's rest is read to record it NOT_SENT; a live camera
    has no rest (it used to be read, and written NOT_SENT, until someone pressed Ctrl-C)."""
    import time

    from perception.cli import main
    from tests.client.conftest import start_server

    srv, port = start_server(tiny_manifest)
    cam = MjpegCamera(fps=50.0)
    out = tmp_path / "o.jsonl"
    result: dict[str, int] = {}
    t = threading.Thread(target=lambda: result.update(rc=main([
        "replay", cam.url("front.mjpg"), "--server", f"127.0.0.1:{port}", "--out", str(out), "--no-progress",
        "--encode", "jpeg", "--reconnect-timeout", "1"])), daemon=True)
    try:
        t.start()
        end = time.monotonic() + 20
        while time.monotonic() < end and not (out.exists() and out.read_bytes().count(b"\n") >= 5):
            time.sleep(0.02)
        srv.shutdown(0.5)  # gone for good
        t.join(30)
        assert not t.is_alive(), "the replay of a live camera never ended after giving up"
    finally:
        srv.shutdown(0.5)
        cam.stop()
    assert result.get("rc", 0) != 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["sequence"] for r in recs] == list(range(len(recs))), "one line per frame read, in order"
    after = [r for r in recs if r["status"] != "OK"]
    # A draining server refuses the frames it gets meanwhile; they are lost with the server too.
    assert after and {r["status"] for r in after} <= {"GIVEN_UP", "NOT_SENT", "REFUSED_DRAINING", "OVERLOADED"}
    assert len([r for r in after if r["status"] == "NOT_SENT"]) <= 1, "only the frame it stopped at"


def test_an_unreachable_network_camera_fails_before_opencv_opens_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCV's FFmpeg backend opens one stream at a time per process: a dead camera held that
    for its whole open timeout, and every other camera's reconnect waited behind it. A TCP
    connect outside OpenCV fails it first, holding nothing."""
    import cv2

    from client.sources.live_source import LiveCapture

    def no_open(*args: object) -> None:
        raise AssertionError("OpenCV was asked to open an unreachable camera")

    monkeypatch.setattr(cv2, "VideoCapture", no_open)
    for url in ("rtsp://127.0.0.1:1/stream", "http://user:pw@127.0.0.1:1/video.mjpg"):
        target = live_target(url)
        assert target is not None
        t0 = time.monotonic()
        with pytest.raises(DataError, match=r"127\.0\.0\.1:1 not reachable") as err:
            LiveCapture(target).open()
        assert time.monotonic() - t0 < 1.0 and "pw" not in str(err.value)


def test_credentials_are_masked_wherever_a_url_is_printed() -> None:
    """A camera's URL is its name in logs and summaries: its user and password must not be."""
    from client.sources.live_source import without_credentials

    assert without_credentials("rtsp://admin:S3cret@10.0.0.5:554/front") == "rtsp://***@10.0.0.5:554/front"
    assert (without_credentials("rtspsrc location=rtsp://u:p@cam/x latency=0 ! decodebin ! appsink")
            == "rtspsrc location=rtsp://***@cam/x latency=0 ! decodebin ! appsink")
    for plain in ("udp://@:1234", "/dev/video0", "http://10.0.0.5:8080/video.mjpg",
                  "http://cam/x?resolution=640x480&fps=15", "rtsp://cam/a@b"):  # "@" in the path: no user
        assert without_credentials(plain) == plain
    # FFmpeg splits the user from the host at the last "@": a password holding one leaked its tail.
    assert without_credentials("http://admin:p@ssW0rd@10.0.0.5/snap.jpg") == "http://***@10.0.0.5/snap.jpg"
    assert (without_credentials("http://10.0.0.5/video.mjpg?user=admin&pwd=S3cretQ&fps=5")
            == "http://10.0.0.5/video.mjpg?user=***&pwd=***&fps=5")
    assert (without_credentials('rtspsrc location=rtsp://cam/x user-id=admin user-pw="S3 cret" ! appsink')
            == "rtspsrc location=rtsp://cam/x user-id=*** user-pw=*** ! appsink")
