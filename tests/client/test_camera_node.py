"""``perception camera``: live cameras streamed to a real server on loopback.

The cameras are real streams too: an HTTP MJPEG server (tests/client/mjpeg_server.py) read by
OpenCV's FFmpeg, stopped and restarted mid-run; a /dev/video device that does not exist; a
recording looped as a fake live camera.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from client import camera_cli
from client.sources.live_source import opencv_has_gstreamer
from perception.errors import ConfigError, PerceptionError
from tests.client import recordings as R
from tests.client.mjpeg_server import MjpegCamera
from tests.conftest import REPO_ROOT


def _answers(path: Path) -> dict[str, list[dict[str, Any]]]:
    by_camera: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if path.exists():
        # Read while the node writes: a last line without its newline is still being written.
        for line in path.read_text().split("\n")[:-1]:
            rec = json.loads(line)
            by_camera[rec["camera_id"]].append(rec)
    return by_camera


def _wait_for(what: str, cond: Any, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _summary_line(stdout: str, camera: str) -> dict[str, int]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith(f"{camera}: "))
    pairs = re.findall(r"(captured|sent|dropped|lost|reconnects|failed opens) (\d+)", line)
    out = {k: int(v) for k, v in pairs}
    ok, answered = re.search(r"answered OK (\d+)/(\d+)", line).groups()  # type: ignore[union-attr]  # fails the test if absent
    out["ok"], out["answered"] = int(ok), int(answered)
    return out


def test_camera_node_streams_mjpeg_and_reconnects_after_the_camera_restarts(server: str, tmp_path: Path) -> None:
    """Two HTTP MJPEG cameras through `perception camera` (a real process, stopped by SIGTERM):
    answers in order per camera; the camera server goes away and comes back on the same port,
    and the node reconnects by itself and keeps going."""
    cam = MjpegCamera(fps=25.0)
    port = cam.port
    out = tmp_path / "answers.jsonl"
    cmd = [sys.executable, "-m", "perception.cli", "camera", cam.url("front.mjpg"), cam.url("rear.mjpg"),
           "--server", server, "--out", str(out), "--retry-max", "0.3", "--stats-every", "0.5"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    cameras = ("front", "rear")
    restarted: list[MjpegCamera] = []
    try:
        _wait_for("answers before the restart",
                  lambda: all(len(_answers(out)[c]) >= 10 for c in cameras))
        cam.stop()
        time.sleep(1.0)  # down long enough for the node to notice and fail to reopen
        before = {c: max(r["sequence"] for r in _answers(out)[c]) for c in cameras}
        restarted.append(MjpegCamera(port=port, fps=25.0))
        _wait_for("answers after the restart",
                  lambda: all(sum(r["sequence"] > before[c] for r in _answers(out)[c]) >= 10 for c in cameras))
        assert proc.poll() is None, "the node must keep running on its own"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for again in restarted:
            again.stop()
    assert proc.returncode == 0, stderr
    answers = _answers(out)
    for c in cameras:
        seqs = [r["sequence"] for r in answers[c]]
        assert seqs == sorted(set(seqs)), f"{c}: answers in order, each frame once"
        assert sum(r["status"] == "OK" for r in answers[c]) >= 0.9 * len(seqs)
        assert all(r["image_width"] == 96 and r["image_height"] == 64 for r in answers[c])
        stamps = [r["capture_timestamp_ns"] for r in answers[c]]
        assert stamps == sorted(stamps) and abs(stamps[-1] / 1e9 - time.time()) < 60, "epoch capture times"
        s = _summary_line(stdout, c)
        assert s["reconnects"] >= 1 and s["failed opens"] >= 1, stdout
        assert s["answered"] == len(seqs) and s["ok"] <= s["answered"] <= s["sent"] <= s["captured"]
        assert s["captured"] == s["sent"] + s["dropped"] or s["captured"] == s["sent"] + s["dropped"] + 1
    assert "camera down" not in stdout
    assert "front.mjpg" in stderr and "reopening" in stderr, "the loss is reported"
    assert "captured" in stderr and "p50 ms" in stderr, "--stats-every printed the live table"


def _run_in_thread(argv: list[str]) -> tuple[threading.Thread, threading.Event, dict[str, Any]]:
    stop = threading.Event()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["rc"] = camera_cli.main(argv, stop=stop)
        except Exception as exc:  # surfaced by the test's assertions
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, stop, result


def test_a_missing_device_is_reported_and_retried_until_stopped(
    server: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="client")
    t, stop, result = _run_in_thread(["/dev/video99", "--server", server, "--retry-max", "0.2"])
    time.sleep(1.5)
    assert t.is_alive(), f"the node must not exit while the camera may come back: {result}"
    stop.set()
    t.join(15)
    assert not t.is_alive() and result == {"rc": 0}
    s = _summary_line(capsys.readouterr().out, "video99")
    assert s["captured"] == 0 and s["reconnects"] == 0
    assert s["failed opens"] >= 3, "retried with backoff"
    msgs = [r.getMessage() for r in caplog.records if r.name == "client.camera_node"]
    assert any("/dev/video99: no such video device" in m and "retrying in" in m for m in msgs), msgs


def test_a_looped_recording_is_a_fake_live_camera_sent_raw(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    video = R.write_mp4(tmp_path / "dashcam.mp4", n=6, fps=20.0)
    out = tmp_path / "o.jsonl"
    t, stop, result = _run_in_thread([str(video), "--loop", "--encode", "raw", "--server", server,
                                      "--out", str(out), "--duration", "1.0", "--json"])
    t.join(20)
    assert result == {"rc": 0}
    (summary,) = json.loads(capsys.readouterr().out)
    assert summary["camera_id"] == "dashcam"
    assert summary["captured"] >= 12, "more than one lap of 6 frames in 1 s at 20 fps"
    assert summary["ok"] >= 10 and summary["lost"] == 0
    seqs = [r["sequence"] for r in _answers(out)["dashcam"]]
    assert seqs == sorted(set(seqs)) and max(seqs) >= 6, "sequence numbers keep growing across laps"


def test_answers_other_than_ok_say_why_in_the_summary_and_in_the_log_once(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A camera whose frames the server answered INVALID showed only "answered OK 7/10": no
    note, no log line said why. The status and the server's message go into both, the log once
    per REPEAT_LOG_S."""
    root = R.write_folder(tmp_path / "cam", n=4)
    (root / "000001.jpg").write_bytes((root / "000001.jpg").read_bytes()[:40])  # truncated: INVALID
    caplog.set_level(logging.INFO, logger="client")
    t, _, result = _run_in_thread([str(root), "--loop", "--server", server, "--duration", "1.2", "--json"])
    t.join(20)
    assert result == {"rc": 0}
    (summary,) = json.loads(capsys.readouterr().out)
    assert summary["answered"] - summary["ok"] >= 2, "frame 1 of every lap of 4 frames at 10 fps"
    assert re.fullmatch(r"frame \d+ answered INVALID: .+", summary["last_error"]), summary["last_error"]
    told = [r.getMessage() for r in caplog.records if "answered INVALID" in r.getMessage()]
    assert len(told) == 1 and told[0].startswith("cam: frame 1 answered INVALID: "), told


def test_track_asks_the_server_for_track_ids(server: str, tmp_path: Path) -> None:
    """A camera node could not ask for tracks (the replay CLI could): --track."""
    import grpc

    from perception.v1 import detector_pb2 as pb
    from perception.v1 import detector_pb2_grpc as pb_grpc
    from tests.server.conftest import jpeg

    # The server loads its tracker at the first tracked frame (numba: seconds on a loaded
    # machine, which this 1.5 s run once spent waiting for it, with 2 frames sent): loaded first.
    with grpc.insecure_channel(server) as channel:
        warm = pb.DetectRequest(frame=pb.Frame(camera_id="warm-up", encoded=jpeg()),
                                options=pb.DetectOptions(track=True))
        pb_grpc.DetectorStub(channel).Detect(warm, timeout=60)
    video = R.write_mp4(tmp_path / "dashcam.mp4", n=6, fps=20.0)
    out = tmp_path / "o.jsonl"
    t, _, result = _run_in_thread([str(video), "--loop", "--track", "--server", server, "--out", str(out),
                                   "--duration", "1.5"])
    t.join(30)
    assert result == {"rc": 0}, result
    dets = [d for r in _answers(out)["dashcam"] if r["status"] == "OK" for d in r["detections"]]
    assert dets and all("track_id" in d and "track_state" in d for d in dets)
    assert any(d["track_id"] > 0 for d in dets)


def _boxes_by_lap_position(path: Path, camera: str, n: int) -> dict[int, list[tuple[Any, ...]]]:
    out: dict[int, list[tuple[Any, ...]]] = {}
    for r in _answers(path)[camera]:
        assert r["status"] == "OK", r
        out.setdefault(r["sequence"] % n, [tuple(d["box"]) + (d["class_id"], d["score"]) for d in r["detections"]])
    return out


def test_shared_memory_frames_match_raw_frames_and_the_ring_is_removed_at_stop(
    tiny_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--encode shm: the same pixels as --encode raw reach the model (equal detections per
    frame of the looped recording), only a slot reference goes over gRPC, and the node's ring
    leaves nothing in /dev/shm. A server without --shm-allow answers INVALID, the node runs on."""
    from tests.client.conftest import start_server

    prefix = f"perception-camtest-{os.getpid()}-"
    srv, port = start_server(tiny_manifest, shm_allow=prefix)
    plain, plain_port = start_server(tiny_manifest)
    video = R.write_mp4(tmp_path / "dashcam.mp4", n=6, fps=20.0)
    try:
        runs = {}
        for encode, target in (("raw", port), ("shm", port), ("shm-refused", plain_port)):
            out = tmp_path / f"{encode}.jsonl"
            argv = [str(video), "--loop", "--encode", encode.split("-")[0], "--shm-prefix", prefix,
                    "--server", f"127.0.0.1:{target}", "--out", str(out), "--duration", "1.0", "--json"]
            t, _, result = _run_in_thread(argv)
            t.join(20)
            assert result == {"rc": 0}, encode
            (runs[encode],) = json.loads(capsys.readouterr().out)
            if encode != "shm-refused":
                assert runs[encode]["ok"] >= 10 and runs[encode]["lost"] == 0, runs[encode]
        raw = _boxes_by_lap_position(tmp_path / "raw.jsonl", "dashcam", 6)
        shm = _boxes_by_lap_position(tmp_path / "shm.jsonl", "dashcam", 6)
        assert len(shm) == 6 and shm == raw
        refused = _answers(tmp_path / "shm-refused.jsonl")["dashcam"]
        assert refused and all(r["status"] == "INVALID" and "--shm-allow" in r["message"] for r in refused)
        assert runs["shm-refused"]["ok"] == 0 and runs["shm-refused"]["lost"] == 0
        assert not [f for f in os.listdir("/dev/shm") if f.startswith(prefix)], "rings are unlinked at stop"
    finally:
        srv.shutdown(1.0)
        plain.shutdown(1.0)


def test_a_camera_url_s_password_is_never_printed(
    server: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole URL was the camera's name: rtsp://admin:S3cret@... went into every open-failure
    warning, the "capturing"/"streaming" lines and the summary's source."""
    caplog.set_level(logging.INFO, logger="client")
    t, stop, result = _run_in_thread(["rtsp://admin:S3cret@127.0.0.1:9/front", "--server", server,
                                      "--retry-max", "0.2", "--json"])
    time.sleep(1.0)
    stop.set()
    t.join(15)
    assert result == {"rc": 0}
    out = capsys.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "rtsp://***@127.0.0.1:9/front" in logged
    for text in (logged, out.out, out.err):
        assert "S3cret" not in text and "admin:" not in text


def test_a_stop_waits_once_for_all_cameras_stuck_opening(server: str) -> None:
    """Network cameras that take the connection and never answer are stuck inside OpenCV's open
    (one at a time per process). SIGTERM joined each camera with the whole stop timeout in turn:
    three such cameras took 12 s to exit, past a container runtime's 10 s before SIGKILL, and
    the summary was lost. One deadline for the node now."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[Any] = []

    def take() -> None:  # connections taken and never answered
        try:
            for _ in range(16):
                held.append(listener.accept())
        except OSError:  # the test closed the listener
            pass

    threading.Thread(target=take, daemon=True).start()
    port = listener.getsockname()[1]
    cameras = [f"http://127.0.0.1:{port}/hung{i}.mjpg" for i in range(3)]
    cmd = [sys.executable, "-m", "perception.cli", "camera", *cameras, "--server", server]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for("the cameras to be opening", lambda: len(held) >= 1, timeout=30)
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        proc.kill()
        listener.close()
    assert proc.returncode == 0 and took < 8.0, f"exit {proc.returncode} {took:.1f} s after SIGTERM"
    assert all(f"hung{i}: captured 0" in out for i in range(3)), out  # the summary was printed


def test_a_recording_without_loop_and_duplicate_ids_are_refused(server: str, tmp_path: Path) -> None:
    video = R.write_mp4(tmp_path / "a.mp4", n=2)
    with pytest.raises(ConfigError, match="add --loop"):
        camera_cli.main([str(video), "--server", server])
    with pytest.raises(ConfigError, match="used twice"):
        camera_cli.main(["http://127.0.0.1:1/video.mjpg", "http://127.0.0.1:2/video.mjpg", "--server", server])
    # The last run's answers stay: --out used to be opened (truncated) before the check.
    previous = tmp_path / "answers.jsonl"
    previous.write_text('{"camera_id": "front"}\n')
    with pytest.raises(ConfigError, match="used twice"):
        camera_cli.main(["http://127.0.0.1:1/video.mjpg", "http://127.0.0.1:2/video.mjpg", "--server", server,
                         "--out", str(previous)])
    assert previous.read_text() == '{"camera_id": "front"}\n'



@pytest.mark.skipif(opencv_has_gstreamer(), reason="this OpenCV has GStreamer")
def test_a_gstreamer_pipeline_is_refused_clearly_without_gstreamer(server: str) -> None:
    with pytest.raises(ConfigError, match="OpenCV built with GStreamer"):
        camera_cli.main(["videotestsrc ! videoconvert ! appsink", "--server", server])


# The RTSP camera is GStreamer's RTSP server from Debian packages (`make test` installs them: scripts/test_services.sh).
RTSP_PACKAGES = ("gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-base "
                 "gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly")
SYSTEM_PYTHON = "/usr/bin/python3"
_RTSP_PROBE = (
    "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
    "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
    "missing = [e for e in ('videotestsrc', 'x264enc', 'rtph264pay') if Gst.ElementFactory.find(e) is None]; "
    "assert not missing, missing"
)


def _rtsp_server_available() -> bool:
    if not Path(SYSTEM_PYTHON).is_file():
        return False
    probe = subprocess.run([SYSTEM_PYTHON, "-c", _RTSP_PROBE], capture_output=True, timeout=60)
    return probe.returncode == 0


class RtspCamera:
    """tests/client/rtsp_camera.py in its own process (Debian's Python)."""

    def __init__(self, port: int = 0) -> None:
        script = Path(__file__).with_name("rtsp_camera.py")
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(script), str(port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"RTSP camera did not start: {line!r} {err}")
        self.port = int(line)
        self.url = f"rtsp://127.0.0.1:{self.port}/cam"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


def test_camera_node_streams_rtsp_h264_and_reconnects_after_the_rtsp_server_restarts(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not _rtsp_server_available():
        pytest.skip(f"needs Debian's GStreamer RTSP server: apt-get install -y {RTSP_PACKAGES}")
    cam = RtspCamera()
    port = cam.port
    out = tmp_path / "o.jsonl"
    t, stop, result = _run_in_thread([cam.url, "--camera-id", "roof", "--server", server, "--out", str(out),
                                      "--retry-max", "0.3"])
    restarted: list[RtspCamera] = []
    try:
        _wait_for("RTSP answers", lambda: len(_answers(out)["roof"]) >= 10)
        cam.stop()
        time.sleep(1.0)
        before = max(r["sequence"] for r in _answers(out)["roof"])
        restarted.append(RtspCamera(port))
        # FFmpeg notices a silent RTSP stream after its read timeout (live_source.STREAM_TIMEOUT_MS).
        _wait_for("RTSP answers after the restart",
                  lambda: sum(r["sequence"] > before for r in _answers(out)["roof"]) >= 10, timeout=45)
        assert t.is_alive()
    finally:
        stop.set()
        t.join(20)
        for again in restarted:
            again.stop()
    assert result == {"rc": 0}
    recs = _answers(out)["roof"]
    seqs = [r["sequence"] for r in recs]
    assert seqs == sorted(set(seqs))
    assert all(r["status"] == "OK" and (r["image_width"], r["image_height"]) == (96, 64) for r in recs)
    s = _summary_line(capsys.readouterr().out, "roof")
    assert s["reconnects"] >= 1 and s["answered"] == len(seqs)


def test_a_stream_ended_again_and_again_for_the_same_reason_is_logged_once_per_interval(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A frame over the server's message limit ends each new stream at once (retrying cannot
    help); the node opens another for the next frame, and says why once per REPEAT_LOG_S, with a
    count, instead of once per frame."""
    import logging
    import types

    from client import camera_node as cn
    from client.camera_stats import CameraStats

    worker = object.__new__(cn.CameraWorker)
    worker.camera_id = "front"
    worker.stats = CameraStats("front", "test")
    worker._replaced_log = cn.RepeatedLog()
    _short_replace_backoff(worker)
    monkeypatch.setattr(worker, "_retire", lambda s: None, raising=False)
    monkeypatch.setattr(worker, "_new_session", lambda: "next", raising=False)
    clock = [100.0]
    monkeypatch.setattr(cn.time, "monotonic", lambda: clock[0])
    too_big = types.SimpleNamespace(error="server a:1: RESOURCE_EXHAUSTED: Received message larger than max",
                                    lost=[1])
    caplog.set_level(logging.DEBUG, logger="client.camera_node")
    for t in (100.0, 100.1, 100.2, 109.0, 111.0, 111.1):
        clock[0] = t
        assert worker._replace(too_big)[0] == "next"  # type: ignore[arg-type]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and "larger than max" in errors[0]
    assert errors[1].endswith("(3 more times since it was last logged)")
    clock[0] = 111.2
    worker._replace(types.SimpleNamespace(error="another reason", lost=[]))  # type: ignore[arg-type]
    assert sum(r.levelno == logging.ERROR for r in caplog.records) == 3  # a new reason is news


def test_a_frame_over_the_servers_message_limit_is_counted_not_sent_and_the_other_camera_goes_on(
    tiny_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A raw 1280x720 frame (2.8 MB) to a server that reads at most 1 MB per message: sent, it
    would end the camera's stream at its length prefix, frame after frame. The node asks the
    server for its limit (GetModelInfo) once, counts such frames ``too_large``, does not send
    them and says why once; the node's other camera, whose frames fit, is answered as usual."""
    from tests.client.conftest import start_server

    srv, port = start_server(tiny_manifest, max_message_bytes=1_000_000)
    wide = R.write_mp4(tmp_path / "wide.mp4", n=4, w=1280, h=720, fps=20.0)
    small = R.write_mp4(tmp_path / "dashcam.mp4", n=6, fps=20.0)
    out = tmp_path / "o.jsonl"
    caplog.set_level(logging.INFO, logger="client")
    try:
        t, _, result = _run_in_thread([str(wide), str(small), "--loop", "--encode", "raw", "--server",
                                       f"127.0.0.1:{port}", "--out", str(out), "--duration", "1.0", "--json"])
        t.join(20)
    finally:
        srv.shutdown(1.0)
    assert result == {"rc": 0}
    runs = {s["camera_id"]: s for s in json.loads(capsys.readouterr().out)}
    assert runs["wide"]["too_large"] >= 5, runs["wide"]
    assert runs["wide"]["sent"] == 0 and runs["wide"]["lost"] == 0 and runs["wide"]["server_reconnects"] == 0
    assert runs["dashcam"]["ok"] >= 10 and runs["dashcam"]["too_large"] == 0 and runs["dashcam"]["lost"] == 0
    answers = _answers(out)
    assert "wide" not in answers and len(answers["dashcam"]) == runs["dashcam"]["answered"]
    told = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(told) == 1 and "over the message limit of 1000000 bytes" in told[0] and "--max-message-bytes" in told[0]


def _mcap_bgr8(path: Path, n: int, short: int) -> Path:
    """A ROS 2 MCAP of ``n`` bgr8 frames on /cameras/front/image_raw; frame ``short`` carries
    half the pixels its size declares (a recorder cut it off)."""
    from mcap_ros2.writer import Writer

    with open(path, "wb") as f:
        writer = Writer(f)
        raw = writer.register_msgdef("sensor_msgs/msg/Image", R.IMAGE_DEF)
        for i in range(n):
            img = R.scene(i)
            data = img.tobytes()
            ts = R.T0_NS + i * 50_000_000
            writer.write_message("/cameras/front/image_raw", raw, {
                "header": {"stamp": {"sec": ts // 10**9, "nanosec": ts % 10**9}, "frame_id": "front"},
                "height": img.shape[0], "width": img.shape[1], "encoding": "bgr8", "is_bigendian": 0,
                "step": img.shape[1] * 3, "data": data[: len(data) // 2] if i == short else data,
            }, log_time=ts)
        writer.finish()
    return path


def test_a_frame_the_node_cannot_send_is_counted_and_the_camera_goes_on(
    tiny_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """--encode shm of a looped recording with one truncated raw frame: the node cannot make a
    request of it. That frame is counted ``failed`` and logged; the sender goes on with the next
    (it used to die, leaving the camera "up" and nothing sent)."""
    from tests.client.conftest import start_server

    prefix = f"perception-camfail-{os.getpid()}-"
    srv, port = start_server(tiny_manifest, shm_allow=prefix)
    mcap = _mcap_bgr8(tmp_path / "front.mcap", n=6, short=2)
    out = tmp_path / "o.jsonl"
    caplog.set_level(logging.INFO, logger="client")
    try:
        t, _, result = _run_in_thread([str(mcap), "--loop", "--encode", "shm", "--shm-prefix", prefix, "--server",
                                       f"127.0.0.1:{port}", "--out", str(out), "--duration", "1.5", "--json"])
        t.join(20)
    finally:
        srv.shutdown(1.0)
    assert result == {"rc": 0}, result
    (s,) = json.loads(capsys.readouterr().out)
    assert s["failed"] >= 1 and s["ok"] >= 10 and s["lost"] == 0, s
    told = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert told and "not sent: ValueError" in told[0], told


class _FakeSession:
    """Stands in for a StreamSession in the sender's bookkeeping: ``gave_up`` makes ``send``
    raise as a session that gave up on the server does."""

    def __init__(self, gave_up: bool, reconnects: int = 0) -> None:
        self.gave_up, self.reconnects = gave_up, reconnects
        self.sent: list[Any] = []
        self.error = PerceptionError("server a:1: gave up") if gave_up else None
        self.lost: list[Any] = []

    def send(self, frame: Any, timeout: float | None = None) -> bool:
        if self.gave_up:
            raise PerceptionError("server a:1: gave up")
        self.sent.append(frame)
        return True

    def abort(self, reason: Any = None) -> None:
        pass

    def join(self, timeout: float | None = None) -> bool:
        return True


def _short_replace_backoff(worker: Any) -> None:
    """A bare worker's backoff between streams that got no answer: 1 ms, for tests about
    something else."""
    from client import camera_node as cn

    worker._retry = cn.BackoffConfig(initial_s=0.001, max_s=0.001)
    worker._replace_backoff = cn.Backoff(worker._retry)
    worker._answered_before = 0
    worker._stop = threading.Event()


def _bare_worker(monkeypatch: pytest.MonkeyPatch, sessions: list[_FakeSession]) -> Any:
    """A CameraWorker without threads or a server, its new streams taken from ``sessions``."""
    import types

    from client import camera_node as cn
    from client.camera_stats import CameraStats
    from client.latest_frame import LatestFrame

    worker: Any = object.__new__(cn.CameraWorker)
    worker.camera_id = "front"
    worker.stats = CameraStats("front", "test")
    worker._slot = LatestFrame()
    worker._config = types.SimpleNamespace(stop_timeout_s=1.0)
    worker._replaced_log, worker._failed_log = cn.RepeatedLog(), cn.RepeatedLog()
    worker._session_lock = threading.Lock()
    worker._session, worker._past_server_reconnects = None, 0
    _short_replace_backoff(worker)
    queue = iter(sessions)

    def new_session() -> Any:
        s = next(queue)
        with worker._session_lock:
            worker._session = s
        return s

    monkeypatch.setattr(worker, "_new_session", new_session, raising=False)
    return worker


def test_the_frame_taken_when_the_stream_gave_up_goes_first_on_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to be in no count: neither sent, nor lost, nor failed."""
    from client.frames import SourceFrame

    dead, fresh = _FakeSession(gave_up=True, reconnects=3), _FakeSession(gave_up=False)
    worker = _bare_worker(monkeypatch, [dead, fresh])
    first = worker._new_session()
    frame = SourceFrame("front", 7, 0, encoded=b"x")
    assert worker._send(first, frame) is fresh
    assert fresh.sent == [frame]
    s = worker.summary()
    assert s.sent == 1 and s.failed == 0
    assert s.server_reconnects == 3  # the retired stream's reconnects, counted once


def test_after_a_wait_to_reopen_the_newest_frame_goes_and_a_stop_opens_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream that gave up without an answer is reopened after a backoff. If the camera gave
    a newer frame meanwhile, the frame held is dropped for it (it could be seconds old); and a
    node stopped during the wait opens no stream, the frame held counted dropped."""
    from client.frames import SourceFrame

    dead, fresh = _FakeSession(gave_up=True), _FakeSession(gave_up=False)
    worker = _bare_worker(monkeypatch, [dead, fresh])
    first = worker._new_session()
    worker._slot.put((8, "newer"))
    assert worker._send(first, SourceFrame("front", 7, 0, encoded=b"x")) is fresh
    assert fresh.sent == [] and worker.stats.dropped == 1

    worker = _bare_worker(monkeypatch, [_FakeSession(gave_up=True)])  # a second stream would fail the test
    first = worker._new_session()
    worker._stop.set()
    assert worker._send(first, SourceFrame("front", 9, 0, encoded=b"x")) is None
    assert worker.stats.dropped == 1 and worker.stats.sent == 0


def test_a_retired_streams_reconnects_are_counted_once_while_it_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between retiring a stream and opening the next, the summary counted the old stream's
    reconnects twice: once as past, once as the live stream's."""
    old = _FakeSession(gave_up=True, reconnects=2)
    worker = _bare_worker(monkeypatch, [old])
    worker._new_session()
    worker._retire(old)
    assert worker.summary().server_reconnects == 2


def test_a_frame_a_refused_stream_took_is_sent_and_lost_not_failed(
    tiny_manifest: Path, tmp_path: Path
) -> None:
    """A server that refuses every stream (here a wrong token). A stream opens its call only
    at its first frame, so each new stream takes the frame and then gives up: the frame taken
    as one stream gave up goes first on the next, and every such frame is ``sent`` and ``lost``,
    never ``failed`` (the count of the node's own errors, once logged with a traceback as one);
    the server's refusal is the camera's last error. (The frame is ``dropped`` only when the new
    stream has given up before it could take it, which a stream without a call cannot.)"""
    from client import camera_node as cn
    from client.config import ClientConfig
    from client.detector_client import DetectorClient
    from client.frames import SourceFrame
    from client.live_capture import RecordingCamera
    from client.sources.base import SourceOptions
    from client.stream import StreamSession
    from tests.client.conftest import start_server

    srv, port = start_server(tiny_manifest, auth_tokens=("right",), insecure_token=True)
    client = DetectorClient(ClientConfig(targets=(f"127.0.0.1:{port}",), token="wrong"))
    camera = RecordingCamera(R.write_mp4(tmp_path / "front.mp4", n=2), SourceOptions())
    worker = cn.CameraWorker("front", camera, client, cn.NodeConfig(stop_timeout_s=1.0), threading.Event())

    def frame(seq: int) -> SourceFrame:
        return SourceFrame("front", seq, 0, encoded=R.jpeg(R.scene(seq)))

    def refused(session: StreamSession) -> StreamSession:
        _wait_for("the server's refusal", lambda: session.error is not None, timeout=10)
        return session

    try:
        first = worker._new_session()
        assert worker._send(first, frame(0)) is first
        second = worker._send(refused(first), frame(1))
        assert second is not None and second is not first, "the second frame goes first on a new stream"
        session = refused(second)
        worker._finish(session)
    finally:
        client.close()
        srv.shutdown(1.0)
    s = worker.summary()
    assert (s.sent, s.lost, s.failed, s.dropped) == (2, 2, 0, 0), s
    assert "UNAUTHENTICATED" in s.last_error, s


def test_a_server_refusing_every_stream_costs_frames_dropped_or_lost_never_failed(
    tiny_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same refusal through `perception camera`: the node keeps opening streams, and every
    frame it captured is accounted for once: sent (and lost: never answered) or dropped."""
    from tests.client.conftest import start_server

    srv, port = start_server(tiny_manifest, auth_tokens=("right",), insecure_token=True)
    video = R.write_mp4(tmp_path / "dashcam.mp4", n=6, fps=20.0)
    try:
        t, _, result = _run_in_thread([str(video), "--loop", "--server", f"127.0.0.1:{port}", "--token", "wrong",
                                       "--duration", "1.5", "--json"])
        t.join(20)
    finally:
        srv.shutdown(1.0)
    assert result == {"rc": 0}, result
    (s,) = json.loads(capsys.readouterr().out)
    assert s["captured"] >= 20 and s["answered"] == 0 and s["failed"] == 0, s
    assert s["lost"] == s["sent"] and s["captured"] - s["sent"] - s["dropped"] in (0, 1), s
    assert "UNAUTHENTICATED" in s["last_error"], s
    # Streams that got no answer are reopened with backoff (0.1 s, doubling, with jitter), not
    # once per frame: a handful of streams in 1.5 s, each sending at most a frame or two.
    assert s["sent"] <= 12 and s["dropped"] >= s["captured"] // 2, s


def _mcap_unreadable(path: Path, n: int) -> Path:
    """A ROS 2 MCAP that opens, but whose every image is cut short: no frame can be read."""
    from mcap_ros2.writer import Writer

    with open(path, "wb") as f:
        writer = Writer(f)
        raw = writer.register_msgdef("sensor_msgs/msg/Image", R.IMAGE_DEF)
        for i in range(n):
            ts = R.T0_NS + i * 50_000_000
            writer.write_message("/cameras/front/image_raw", raw, {
                "header": {"stamp": {"sec": ts // 10**9, "nanosec": ts % 10**9}, "frame_id": "front"},
                "height": 64, "width": 96, "encoding": "mono16", "is_bigendian": 0, "step": 192,
                "data": bytes(100),
            }, log_time=ts)
        writer.finish()
    return path


def test_an_unexpected_error_opening_a_camera_is_a_failed_open_retried(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """open() raising anything but DataError / ConfigError (a driver or library bug) ended the
    capture thread: the node ran on idle and exited 0, nothing sent. It is a failed open now,
    retried, and the camera streams once it opens."""
    from client import live_capture

    video = R.write_mp4(tmp_path / "dashcam.mp4", n=6, fps=20.0)
    real_open, calls = live_capture.RecordingCamera.open, []

    def flaky_open(self: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("driver hiccup")
        real_open(self)

    monkeypatch.setattr(live_capture.RecordingCamera, "open", flaky_open)
    t, _, result = _run_in_thread([str(video), "--loop", "--server", server, "--retry-max", "0.2",
                                   "--duration", "2.0"])
    t.join(20)
    assert result == {"rc": 0}, result
    s = _summary_line(capsys.readouterr().out, "dashcam")
    assert s["failed opens"] == 1 and s["captured"] > 0 and s["ok"] > 0, s


def test_a_camera_that_opens_but_delivers_no_frame_is_a_failed_open_not_a_reconnect(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Each attempt opens the camera and reads nothing (a stream whose packets never come, a
    recording no frame of which can be read): a failed open, retried with backoff and said once
    at WARNING. Each used to be counted a reconnect, of a camera that never came back."""
    mcap = _mcap_unreadable(tmp_path / "front.mcap", n=4)
    caplog.set_level(logging.INFO, logger="client")
    t, _, result = _run_in_thread([str(mcap), "--loop", "--server", server, "--retry-max", "0.2",
                                   "--duration", "1.5"])
    t.join(20)
    assert result == {"rc": 0}, result
    out = capsys.readouterr().out
    s = _summary_line(out, "front")
    assert s["captured"] == 0 and s["reconnects"] == 0 and s["failed opens"] >= 3, out
    assert "[camera down]" in out
    said = [r for r in caplog.records if r.name == "client.camera_node" and "has only 100 bytes" in r.getMessage()]
    assert len(said) >= 3 and [r.levelno for r in said].count(logging.WARNING) == 1, said


def test_shm_rings_take_the_mode_and_group_given(tiny_manifest: Path, tmp_path: Path) -> None:
    """--shm-mode 640 --shm-group G: a server running as another user of group G can read the
    rings (the vehicle unit's dynamic user); the node used to make them 0600 whatever it was told."""
    from tests.client.conftest import start_server

    prefix = f"perception-modetest-{os.getpid()}-"
    srv, port = start_server(tiny_manifest, shm_allow=prefix)
    video = R.write_mp4(tmp_path / "dashcam.mp4", n=6, fps=20.0)
    gid = os.getgid()
    try:
        argv = [str(video), "--loop", "--encode", "shm", "--shm-prefix", prefix, "--shm-mode", "640",
                "--shm-group", str(gid), "--server", f"127.0.0.1:{port}", "--duration", "2.0"]
        t, _, result = _run_in_thread(argv)
        seen: list[os.stat_result] = []
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            seen = [os.stat(f"/dev/shm/{f}") for f in os.listdir("/dev/shm") if f.startswith(prefix)]
            time.sleep(0.05)
        t.join(20)
        assert result == {"rc": 0}
        assert seen and all(s.st_mode & 0o777 == 0o640 and s.st_gid == gid for s in seen), seen
    finally:
        srv.shutdown(1.0)
    from client.camera_node import NodeConfig

    with pytest.raises(ConfigError, match="mode"):
        NodeConfig(shm_mode=0o666)
    with pytest.raises(ConfigError, match="does not exist"):
        NodeConfig(shm_mode=0o640, shm_group="no-such-group-here")


def test_interleaved_statuses_are_each_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """Under overload stale, expired and overloaded answers interleave: with one repeat guard for
    every status each reset it, and every answer was logged (90 lines for 90 answers)."""
    import threading
    import types

    from client.camera_node import CameraWorker
    from client.frames import FrameStatus

    notes: list[str] = []
    worker = types.SimpleNamespace(_answer_logs={}, _answer_log_lock=threading.Lock(), camera_id="front",
                                   stats=types.SimpleNamespace(note=notes.append))
    caplog.set_level(logging.WARNING, logger="client")
    statuses = [FrameStatus.DROPPED_STALE, FrameStatus.EXPIRED, FrameStatus.OVERLOADED] * 30
    for i, status in enumerate(statuses):
        CameraWorker._not_ok(worker, types.SimpleNamespace(status=status, sequence=i, message="why"))  # type: ignore[arg-type]
    told = [r.getMessage() for r in caplog.records if r.name.startswith("client")]
    assert len(told) == 3 and len(notes) == 3, told
