"""`perception replay --mcap-out`: the bundled drive replayed against a real server on loopback,
read back with the `mcap` library as Foxglove would (images + ImageAnnotations per camera), and
the sink itself on hand-made answers (statuses other than OK, raw frames, the atomic rename)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from client.frames import FrameResult, FrameStatus, SourceFrame
from client.sinks.mcap_annotations import LINE_LOOP, McapAnnotationsSink
from client.sources import SourceOptions, open_source
from client.sources.images import bgr_frame
from perception.cli import main
from perception.types import Detections, StageTimings
from tests.client import recordings as R

DEMO = Path(__file__).resolve().parents[2] / "assets/drives/demo/drive.mcap"
FRAMES = 8


def _replay(*args: str) -> int:
    return main(["replay", *args, "--no-progress"])


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _read_mcap(path: Path) -> tuple[dict[str, tuple[str, str, str]], list[tuple[str, int, dict[str, Any]]]]:
    """(topic -> (schema name, schema encoding, message encoding), [(topic, log time, message)])."""
    import jsonschema
    from mcap.reader import make_reader

    channels: dict[str, tuple[str, str, str]] = {}
    messages = []
    with open(path, "rb") as f:
        for schema, channel, message in make_reader(f).iter_messages(log_time_order=True):
            assert schema is not None
            channels[channel.topic] = (schema.name, schema.encoding, channel.message_encoding)
            msg = json.loads(message.data)
            jsonschema.validate(msg, json.loads(schema.data))  # each message matches its channel's schema
            messages.append((channel.topic, message.log_time, msg))
    return channels, messages


def _corners(box: list[float]) -> list[dict[str, float]]:
    x1, y1, x2, y2 = box
    return [{"x": x1, "y": y1}, {"x": x2, "y": y1}, {"x": x2, "y": y2}, {"x": x1, "y": y2}]


def _by_frame(messages: list[tuple[str, int, dict[str, Any]]], kind: str) -> dict[tuple[str, int], list[Any]]:
    """(camera, log time) -> the messages of that frame on /<camera>/<kind>."""
    out: dict[tuple[str, int], list[Any]] = {}
    for topic, t, msg in messages:
        _, cam, leaf = topic.split("/")
        if leaf == kind:
            out.setdefault((cam, t), []).append(msg)
    return out


def _replay_demo(tmp_path: Path, server: str, *extra: str) -> tuple[list[dict[str, Any]], Path]:
    out, mcap = tmp_path / "out.jsonl", tmp_path / "drive_detections.mcap"
    rc = _replay(str(DEMO), "--server", server, "--out", str(out), "--mcap-out", str(mcap),
                 "--max-frames", str(FRAMES), "--max-rate", *extra)
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drive_detections.mcap", "out.jsonl"], "no temp file left"
    return _jsonl(out), mcap


def test_mcap_out_draws_the_jsonl_detections_on_the_source_images(tmp_path: Path, server: str) -> None:
    recs, mcap = _replay_demo(tmp_path, server)
    assert len(recs) == FRAMES and {r["camera_id"] for r in recs} == {"front", "rear"}
    channels, messages = _read_mcap(mcap)
    assert channels == {
        f"/{cam}/{leaf}": (schema, "jsonschema", "json")
        for cam in ("front", "rear")
        for leaf, schema in (("image", "foxglove.CompressedImage"), ("detections", "foxglove.ImageAnnotations"))
    }
    images, annotations = _by_frame(messages, "image"), _by_frame(messages, "detections")
    answered = [r for r in recs if r["status"] == "OK"]
    assert len(images) == len(recs) and len(annotations) == len(answered)
    assert sum(len(v) for v in images.values()) == len(recs), "one image message per frame"
    assert sum(len(v) for v in annotations.values()) == len(answered), "one annotation message per OK answer"

    # The images are the recorded JPEG bytes, stamped with their capture time.
    recorded: dict[tuple[str, int], bytes] = {}
    for frame in open_source(DEMO, SourceOptions()):
        if len(recorded) == FRAMES:
            break
        assert frame.encoded is not None
        recorded[(frame.camera_id, frame.timestamp_ns)] = frame.encoded
    for key, [img] in images.items():
        assert img["frame_id"] == key[0] and img["format"] == "jpeg"
        assert img["timestamp"] == {"sec": key[1] // 10**9, "nsec": key[1] % 10**9}
        assert base64.b64decode(img["data"]) == recorded[key]

    n_dets = 0
    for r in answered:
        [ann] = annotations[(r["camera_id"], r["capture_timestamp_ns"])]
        dets = r["detections"]
        n_dets += len(dets)
        assert len(ann["points"]) == len(ann["texts"]) == len(dets)
        for d, pts, txt in zip(dets, ann["points"], ann["texts"], strict=True):
            assert pts["type"] == LINE_LOOP and pts["points"] == _corners(d["box"])
            assert pts["thickness"] > 0 and pts["outline_color"]["a"] == 1.0
            name, score = txt["text"].split(" ")
            assert name == d["class_name"] and float(score) == pytest.approx(d["score"], abs=0.006)
            assert "#" not in txt["text"], "no track ids without --track"
            assert txt["position"]["x"] == d["box"][0] and txt["font_size"] > 0
    assert n_dets > 0, "the tiny model detected nothing: the test would prove nothing"


def test_mcap_out_labels_carry_the_track_id_with_track(tmp_path: Path, server: str) -> None:
    recs, mcap = _replay_demo(tmp_path, server, "--track")
    _, messages = _read_mcap(mcap)
    annotations = _by_frame(messages, "detections")
    tracked = 0
    for r in recs:
        if r["status"] != "OK":
            continue
        [ann] = annotations[(r["camera_id"], r["capture_timestamp_ns"])]
        assert len(ann["texts"]) == len(r["detections"])
        for d, txt in zip(r["detections"], ann["texts"], strict=True):
            if d["track_id"]:
                tracked += 1
                assert txt["text"].startswith(f"#{d['track_id']} {d['class_name']} ")
            else:
                assert txt["text"].startswith(f"{d['class_name']} ")
    assert tracked > 0


def test_mcap_out_to_an_unwritable_path_is_a_one_line_error_before_any_frame(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    out = tmp_path / "out.jsonl"
    out.write_text("an earlier run\n")
    rc = _replay(str(DEMO), "--server", server, "--out", str(out), "--mcap-out", str(not_a_dir / "sub" / "o.mcap"),
                 "--max-frames", str(FRAMES), "--max-rate")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0].startswith(f"perception replay: error: {not_a_dir / 'sub' / 'o.mcap'}: cannot write")
    assert out.read_text() == "an earlier run\n", "failed before --out was opened, let alone a frame sent"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_mcap_out_into_a_read_only_directory_is_a_one_line_error(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc = _replay(str(DEMO), "--server", server, "--mcap-out", str(ro / "o.mcap"), "--max-frames", "2")
    finally:
        ro.chmod(0o700)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "cannot write" in err[0] and not list(ro.iterdir())


def test_ctrl_c_publishes_the_frames_answered_so_far(tmp_path: Path, server: str) -> None:
    out, mcap = tmp_path / "o.jsonl", tmp_path / "o.mcap"
    cmd = [sys.executable, "-m", "perception.cli", "replay", str(DEMO), "--server", server, "--out", str(out),
           "--mcap-out", str(mcap), "--no-progress"]  # recorded speed: 6 s, interrupted long before the end
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 20
        while not (out.exists() and out.read_bytes().count(b"\n") >= 6):
            assert time.monotonic() < end and proc.poll() is None, "the replay did not get going"
            time.sleep(0.02)
        assert not mcap.exists() and [p.name for p in tmp_path.glob(".o.mcap.*.tmp")], "written under a temp name"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    recs = _jsonl(out)
    answered = [r for r in recs if r["status"] not in ("NOT_SENT", "GIVEN_UP", "REFUSED_DRAINING")]
    assert 6 <= len(answered) < len(recs)
    _, messages = _read_mcap(mcap)  # finished: summary and indexes readable
    assert sum(1 for topic, _, _ in messages if topic.endswith("/image")) == len(answered)
    assert sum(1 for topic, _, _ in messages if topic.endswith("/detections")) == sum(
        r["status"] == "OK" for r in answered
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "o.mcap"]


# -- the sink on hand-made answers ------------------------------------------------------------


def _answer(frame: SourceFrame, status: FrameStatus, boxes: list[list[float]]) -> FrameResult:
    n = len(boxes)
    return FrameResult(
        camera_id=frame.camera_id, sequence=frame.sequence, capture_timestamp_ns=frame.timestamp_ns, status=status,
        message="", image_width=96, image_height=64,
        detections=Detections(np.array(boxes, np.float32).reshape(n, 4), np.full((n,), 0.5, np.float32),
                              np.zeros((n,), np.int64)),
        class_names=("car",) * n, timings=StageTimings(),
    )


def test_sink_writes_the_image_only_for_a_frame_not_answered_ok_and_encodes_raw_frames(tmp_path: Path) -> None:
    jpeg = SourceFrame("front", 0, R.T0_NS, encoded=R.jpeg(R.scene(0)))
    stale = SourceFrame("front", 1, R.T0_NS + 50_000_000, encoded=R.jpeg(R.scene(1)))
    raw = bgr_frame("rear", 0, R.T0_NS + 3_000_000, R.scene(0))
    path = tmp_path / "o.mcap"
    sink = McapAnnotationsSink(path)
    sink.write(jpeg, _answer(jpeg, FrameStatus.OK, [[1, 2, 30, 40]]))
    sink.write(stale, _answer(stale, FrameStatus.DROPPED_STALE, []))
    sink.write(raw, _answer(raw, FrameStatus.OK, []))
    assert not path.exists(), "published by close() only"
    sink.close()
    sink.close()  # idempotent
    assert [p.name for p in tmp_path.iterdir()] == ["o.mcap"]
    _, messages = _read_mcap(path)
    assert Counter(topic for topic, _, _ in messages) == {
        "/front/image": 2, "/front/detections": 1, "/rear/image": 1, "/rear/detections": 1
    }
    dets = {t: m for topic, t, m in messages if topic.endswith("/detections")}
    assert dets[R.T0_NS]["points"][0]["points"] == _corners([1.0, 2.0, 30.0, 40.0])
    assert dets[R.T0_NS]["texts"][0]["text"] == "car 0.50"
    assert dets[R.T0_NS + 3_000_000] == {"circles": [], "points": [], "texts": []}, "OK and nothing found"
    [raw_img] = [m for topic, _, m in messages if topic == "/rear/image"]
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(raw_img["data"]), np.uint8), cv2.IMREAD_COLOR)
    assert raw_img["format"] == "jpeg" and decoded is not None and decoded.shape == (64, 96, 3)


def test_outputs_written_whole_get_the_mode_any_new_file_gets(tmp_path: Path) -> None:
    """The MCAP and JSON outputs came out 0600 (mkstemp's mode, kept through the rename) where
    the JSONL beside them was 0644: a replay Job's results on a shared volume could not be read
    by anyone else."""
    from client.sinks.atomic_json import write_json_atomic

    old = os.umask(0o022)
    try:
        sink = McapAnnotationsSink(tmp_path / "o.mcap")
        frame = SourceFrame("front", 0, R.T0_NS, encoded=R.jpeg(R.scene(0)))
        sink.write(frame, _answer(frame, FrameStatus.OK, []))
        sink.close()
        write_json_atomic(tmp_path / "o.json", {"a": 1})
    finally:
        os.umask(old)
    assert oct((tmp_path / "o.mcap").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "o.json").stat().st_mode & 0o777) == oct(0o644)


def test_sink_discards_its_file_after_a_failed_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from perception.errors import DataError

    path = tmp_path / "o.mcap"
    path.write_bytes(b"an earlier run")
    sink = McapAnnotationsSink(path)
    frame = SourceFrame("front", 0, R.T0_NS, encoded=R.jpeg(R.scene(0)))

    def disk_full(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sink._writer, "add_message", disk_full)
    with pytest.raises(DataError, match="o.mcap: cannot write: No space left on device"):
        sink.write(frame, _answer(frame, FrameStatus.OK, []))
    sink.close()
    assert [p.name for p in tmp_path.iterdir()] == ["o.mcap"] and path.read_bytes() == b"an earlier run"
