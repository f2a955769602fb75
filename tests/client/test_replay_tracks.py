"""`perception replay --track` against a real server on loopback: track ids in the JSONL, the
tracking scores in the summary with a ground truth that has tracks, and the annotated video's
colour per track."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.convert import RequestOptions, from_response, to_request
from client.frames import FrameResult, FrameStatus, SourceFrame, Tracks
from client.sinks.annotated_video import UNTRACKED_COLOR, annotate, class_color, track_color
from client.summary import format_table
from perception.cli import main
from perception.tracking import TrackState
from perception.types import Detections, StageTimings
from perception.v1 import detector_pb2 as pb
from tests.client import recordings as R
from tests.tiny_model import CLASSES


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _replay(*args: str) -> int:
    return main(["replay", *args, "--no-progress"])


# -- end to end -----------------------------------------------------------------------------


def test_track_ids_persist_across_frames_of_a_camera(tmp_path: Path, server: str) -> None:
    src = R.write_mcap_ros2(tmp_path / "drive.mcap", cameras=("front", "rear"), n=6)
    out = tmp_path / "tracked.jsonl"
    assert _replay(str(src), "--server", server, "--out", str(out), "--max-rate", "--track") == 0
    recs = _jsonl(out)
    assert len(recs) == 12 and all(r["status"] == "OK" for r in recs)
    frames_of: dict[tuple[str, int], list[int]] = defaultdict(list)  # (camera, track id) -> its sequences
    for r in recs:
        dets = r["detections"]
        assert dets and all(set(d) >= {"track_id", "track_state"} for d in dets)
        tracked = [d["track_id"] for d in dets if d["track_id"]]
        assert len(tracked) == len(set(tracked)), "a track id is on one box of a frame at most"
        for d in dets:
            if d["track_id"] == 0:
                assert d["track_state"] is None
            else:
                assert d["track_state"] in {s.value for s in TrackState}
                frames_of[(r["camera_id"], d["track_id"])].append(r["sequence"])
    for cam in ("front", "rear"):
        lasting = [seqs for (c, _), seqs in frames_of.items() if c == cam and len(seqs) >= 3]
        assert lasting, f"camera {cam}: no track lasts three frames"
    # A track seen again is confirmed by then, and said so.
    states = {(r["camera_id"], d["track_id"], r["sequence"]): d["track_state"] for r in recs for d in r["detections"]}
    key, seqs = next((k, s) for k, s in frames_of.items() if len(s) >= 3)
    assert states[(key[0], key[1], seqs[0])] == "NEW" and states[(key[0], key[1], seqs[-1])] == "CONFIRMED"

    plain = tmp_path / "plain.jsonl"
    assert _replay(str(src), "--server", server, "--out", str(plain), "--max-rate") == 0
    dets = [d for r in _jsonl(plain) for d in r["detections"]]
    assert dets and not any("track_id" in d or "track_state" in d for d in dets), "no --track: the records of old"


def _gt_from_run(recs: list[dict[str, Any]], with_track_ids: bool = True) -> tuple[dict[str, Any], int]:
    """Ground truth made of a tracked run's tracked boxes (2 of 3 kept, at least 2x2 px: the
    random tiny model also emits sliver boxes whose IoU does not survive JSON rounding), each
    ground-truth track named by its server track id + 1000. Returns (COCO dict, boxes kept)."""
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for k, r in enumerate(recs, 1):
        images.append({"id": 100 + k, "file_name": f"{r['camera_id']}/{r['sequence']:06d}.jpg", "width": 96,
                       "height": 64, "camera_id": r["camera_id"], "sequence": r["sequence"]})
        for j, d in enumerate(d for d in r["detections"] if d["track_id"]):
            x1, y1, x2, y2 = d["box"]
            if j % 3 == 2 or x2 - x1 < 2 or y2 - y1 < 2:
                continue
            ann = {"id": len(anns) + 1, "image_id": 100 + k, "category_id": d["class_id"] + 1,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            if with_track_ids:
                ann["track_id"] = d["track_id"] + 1000
            anns.append(ann)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    return {"images": images, "annotations": anns, "categories": categories}, len(anns)


def test_replay_with_tracked_gt_reports_tracking_scores(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = R.write_mcap_ros2(tmp_path / "drive.mcap", cameras=("front", "rear"), n=6)
    first = tmp_path / "first.jsonl"
    assert _replay(str(src), "--server", server, "--out", str(first), "--max-rate", "--track") == 0
    gt, kept = _gt_from_run(_jsonl(first))
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    capsys.readouterr()

    second, summ = tmp_path / "second.jsonl", tmp_path / "s.json"
    assert _replay(str(src), "--server", server, "--out", str(second), "--json-out", str(summ),
                   "--gt", str(gt_path), "--max-rate", "--track") == 0
    tracking = json.loads(summ.read_text())["tracking"]
    assert tracking["confirmed_only"] is False and set(tracking["cameras"]) == {"front", "rear"}
    o = tracking["overall"]
    # The server tracks the same frames the same way again (under new ids: a camera whose
    # sequence goes back restarts its tracker): every ground-truth box is found under one id
    # per track; the tracked boxes left out of the ground truth are the false positives.
    hyps = sum(1 for r in _jsonl(second) for d in r["detections"] if d["track_id"])
    assert (o["frames"], o["gt_boxes"], o["tracked_boxes"]) == (12, kept, hyps)
    assert (o["true_positives"], o["misses"], o["id_switches"], o["fragmentations"]) == (kept, 0, 0, 0)
    assert o["false_positives"] == hyps - kept > 0
    assert o["recall"] == pytest.approx(1.0) and o["precision"] == pytest.approx(kept / hyps)
    assert o["mota"] == pytest.approx(1 - (hyps - kept) / kept)
    assert o["idf1"] == pytest.approx(2 * kept / (kept + hyps))
    assert sum(c["gt_boxes"] for c in tracking["cameras"].values()) == kept
    assert tracking["untracked_detections"] == sum(
        1 for r in _jsonl(second) for d in r["detections"] if not d["track_id"]
    )
    printed = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(printed) if line.startswith("tracking  MOTA "))
    assert printed[row - 2].startswith("KPI  "), "the tracking scores come under the KPI lines"
    kpi = json.loads(summ.read_text())["kpi"]
    assert printed[row - 1].strip() == (f"over {kpi['frames_evaluated']} frames; answered frames with no "
                                        "ground-truth image 0, ground-truth images not replayed 0")
    assert f"MOTA {o['mota']:.4f}  IDF1 {o['idf1']:.4f}  ID switches 0  fragmentations 0" in printed[row]
    assert [line.split()[1] for line in printed[row + 1:row + 3]] == ["front", "rear"]

    confirmed = tmp_path / "confirmed.json"
    assert _replay(str(src), "--server", server, "--json-out", str(confirmed), "--gt", str(gt_path),
                   "--max-rate", "--track", "--track-confirmed-only") == 0
    c = json.loads(confirmed.read_text())["tracking"]
    new_boxes = sum(1 for r in _jsonl(second) for d in r["detections"] if d["track_state"] == "NEW")
    assert c["confirmed_only"] is True and c["unconfirmed_detections"] == new_boxes > 0
    assert c["overall"]["tracked_boxes"] == hyps - new_boxes
    assert c["overall"]["misses"] > 0, "the ground truth has the boxes of tracks not yet confirmed"

    # Under 1e6 px every ground-truth box is don't care, and so is every detection (each is on
    # one, or under 1e6 px itself); the summary says which rule it scored by.
    capsys.readouterr()
    dont_care = tmp_path / "dont_care.json"
    assert _replay(str(src), "--server", server, "--json-out", str(dont_care), "--gt", str(gt_path),
                   "--max-rate", "--track", "--track-min-gt-height", "1e6") == 0
    d = json.loads(dont_care.read_text())["tracking"]
    assert d["min_gt_height"] == 1e6 and d["dont_care_gt_boxes"] == kept and d["overall"]["gt_boxes"] == 0
    assert d["dont_care_detections"] == hyps, "every detection is on a don't-care box or itself under 1e6 px"
    assert any(line.startswith("tracking (ground truth under 1e+06 px don't care)  MOTA n/a")
               for line in capsys.readouterr().out.splitlines())


def test_gt_without_track_ids_says_so_in_one_line(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = R.write_mcap_ros2(tmp_path / "drive.mcap", cameras=("front",), n=3)
    first = tmp_path / "first.jsonl"
    assert _replay(str(src), "--server", server, "--out", str(first), "--max-rate", "--track") == 0
    gt, _ = _gt_from_run(_jsonl(first), with_track_ids=False)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    capsys.readouterr()
    summ = tmp_path / "s.json"
    assert _replay(str(src), "--server", server, "--json-out", str(summ), "--gt", str(gt_path), "--max-rate",
                   "--track") == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "track_id" in line]
    assert err == [f"perception replay: {gt_path} has no track_id in its annotations: tracking is not scored"]
    s = json.loads(summ.read_text())
    assert "tracking" not in s and "track_id" in s["tracking_skipped"] and "kpi" in s


def test_track_confirmed_only_needs_track_and_gt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = R.write_folder(tmp_path / "cam", n=1)
    assert _replay(str(src), "--server", "127.0.0.1:1", "--track", "--track-confirmed-only") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("perception replay: error: --track-confirmed-only chooses what tracking scores count: "
                       "it needs --track and --gt")


def test_track_min_gt_height_needs_track_and_gt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = R.write_folder(tmp_path / "cam", n=1)
    assert _replay(str(src), "--server", "127.0.0.1:1", "--track", "--track-min-gt-height", "16") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("perception replay: error: --track-min-gt-height chooses what tracking scores count: "
                       "it needs --track and --gt")


def test_annotated_video_of_a_tracked_replay(tmp_path: Path, server: str) -> None:
    import cv2

    src = R.write_mp4(tmp_path / "front.mp4", n=4)
    video = tmp_path / "annotated.avi"
    assert _replay(str(src), "--server", server, "--video-out", str(video), "--max-rate", "--track") == 0
    cap = cv2.VideoCapture(str(video))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 4


# -- the pieces -----------------------------------------------------------------------------


def _result(seq: int, boxes: list[list[float]], class_ids: list[int], tracks: Tracks | None) -> FrameResult:
    n = len(boxes)
    return FrameResult(
        camera_id="front", sequence=seq, capture_timestamp_ns=seq, status=FrameStatus.OK, message="",
        image_width=160, image_height=120,
        detections=Detections(np.array(boxes, np.float32).reshape(n, 4), np.full((n,), 0.9, np.float32),
                              np.array(class_ids, np.int64)),
        class_names=tuple(CLASSES[c] for c in class_ids), timings=StageTimings(), tracks=tracks,
    )


def _bottom_edge_color(img: np.ndarray, box: list[float]) -> tuple[int, int, int]:
    """The BGR colour in the middle of a box's bottom edge (its label is drawn at the top)."""
    x1, _, x2, y2 = (int(v) for v in box)
    b, g, r = (int(v) for v in img[y2, (x1 + x2) // 2])
    return b, g, r


def test_annotate_colours_a_track_the_same_in_every_frame() -> None:
    blank = np.zeros((120, 160, 3), np.uint8)
    a0, b0 = [10.0, 40.0, 50.0, 80.0], [90.0, 20.0, 130.0, 70.0]
    a1, b1, c1 = [20.0, 45.0, 60.0, 85.0], [100.0, 30.0, 140.0, 60.0], [60.0, 90.0, 90.0, 110.0]
    # Frame 0: track 7 (car) and track 8 (pedestrian). Frame 1: track 7 has moved and is seen as
    # another class; track 8 has moved too; a box without a track.
    f0 = annotate(blank, _result(0, [a0, b0], [0, 1], Tracks(np.array([7, 8]), (TrackState.NEW, TrackState.NEW))))
    f1 = annotate(blank, _result(1, [a1, b1, c1], [2, 1, 0],
                                 Tracks(np.array([7, 8, 0]), (TrackState.CONFIRMED, TrackState.CONFIRMED, None))))
    assert _bottom_edge_color(f0, a0) == _bottom_edge_color(f1, a1) == track_color(7)
    assert _bottom_edge_color(f0, b0) == _bottom_edge_color(f1, b1) == track_color(8)
    assert track_color(7) != track_color(8)
    assert _bottom_edge_color(f1, c1) == UNTRACKED_COLOR
    # Without tracks the colour is the class's, as before.
    plain = annotate(blank, _result(0, [a0], [2], None))
    assert _bottom_edge_color(plain, a0) == class_color(2)


def test_a_frame_of_another_size_has_its_boxes_drawn_where_its_objects_are(tmp_path: Path) -> None:
    """The annotated video keeps the first frame's size. A later frame of another size (a
    camera that changed resolution) is drawn on first and then resized, so its boxes, in its own
    pixels, land on its objects; resized first, they were drawn at twice the scale, off the
    picture here."""
    import cv2

    from client.sinks.annotated_video import AnnotatedVideoSink

    def frame(seq: int, w: int, h: int) -> SourceFrame:
        return SourceFrame("front", seq, seq, encoded=cv2.imencode(".jpg", np.zeros((h, w, 3), np.uint8))[1].tobytes())

    def result(seq: int, w: int, h: int, boxes: list[list[float]]) -> FrameResult:
        return dataclasses.replace(_result(seq, boxes, [0] * len(boxes), None), image_width=w, image_height=h)

    video = tmp_path / "annotated.avi"
    sink = AnnotatedVideoSink(video, fps=5)
    sink.write(frame(0, 640, 360), result(0, 640, 360, []))
    sink.write(frame(1, 1280, 720), result(1, 1280, 720, [[400.0, 200.0, 800.0, 600.0]]))
    sink.close()
    cap = cv2.VideoCapture(str(video))
    images = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        images.append(img)
    assert [im.shape for im in images] == [(360, 640, 3)] * 2
    # The box at half scale: x 200-400, bottom edge at y 300.
    assert images[1][297:304, 280:320].max() > 80, "no box edge where the object is"


def test_track_colors_are_stable_and_distinct_for_neighbouring_ids() -> None:
    assert track_color(0) == UNTRACKED_COLOR
    colours = [track_color(i) for i in range(1, 33)]
    assert colours == [track_color(i) for i in range(1, 33)]
    assert all(a != b for a, b in zip(colours, colours[1:], strict=False))
    assert UNTRACKED_COLOR not in colours
    # A server's ids start near 1.8e15 (restart-safe): the hue was computed in doubles, whose
    # steps there are 0.125, and 32 tracks took 8 colours.
    base = 1_800_000_000_000_000
    assert len({track_color(base + i) for i in range(32)}) == 32


def test_tracks_on_the_wire_and_in_jsonl() -> None:
    frame = SourceFrame("front", 3, 99, encoded=b"\xff\xd8")
    assert to_request(frame, RequestOptions(track=True)).options.track
    assert not to_request(frame, RequestOptions()).options.track
    resp = pb.DetectResponse(camera_id="front", sequence=3, status=pb.FRAME_STATUS_OK, detections=[
        pb.Detection(box=pb.Box(x1=1, y1=2, x2=3, y2=4), score=0.5, class_id=0, class_name="car", track_id=12,
                     track_state=pb.TRACK_STATE_CONFIRMED),
        pb.Detection(box=pb.Box(x1=5, y1=6, x2=7, y2=8), score=0.4, class_id=1, class_name="pedestrian"),
    ])
    result = from_response(resp)
    assert result.tracks is not None
    assert result.tracks.ids.tolist() == [12, 0] and result.tracks.states == (TrackState.CONFIRMED, None)
    record = result.to_json_dict()
    dets = record["detections"]
    assert isinstance(dets, list)
    assert [(d["track_id"], d["track_state"]) for d in dets] == [(12, "CONFIRMED"), (0, None)]
    back = FrameResult.from_json_dict(json.loads(json.dumps(record)))
    assert back.tracks is not None and back.tracks.ids.tolist() == [12, 0]
    assert back.tracks.states == (TrackState.CONFIRMED, None) and "detections" in back.to_json_dict()
    # No track anywhere in the answer: no tracks, and a record without the fields.
    resp.detections[0].track_id, resp.detections[0].track_state = 0, pb.TRACK_STATE_UNSPECIFIED
    untracked = from_response(resp)
    assert untracked.tracks is None
    assert FrameResult.from_json_dict(untracked.to_json_dict()).tracks is None


def test_tracks_must_fit_the_detections() -> None:
    from perception.errors import DataError, InvalidInputError

    with pytest.raises(InvalidInputError, match="2 tracks for 1 detections"):
        _result(0, [[1.0, 1.0, 5.0, 5.0]], [0], Tracks(np.array([1, 2]), (None, None)))
    with pytest.raises(InvalidInputError, match="negative"):
        Tracks(np.array([-1]), (None,))
    record = _result(0, [[1.0, 1.0, 5.0, 5.0]], [0], Tracks(np.array([1]), (TrackState.NEW,))).to_json_dict()
    record["detections"][0]["track_id"] = -3  # type: ignore[index]  # a JSON list of dicts
    with pytest.raises(DataError, match="negative"):
        FrameResult.from_json_dict(record)


def test_summary_table_without_kpi_and_with_undefined_rates() -> None:
    scores = {"mota": None, "idf1": 0.5, "id_switches": 2, "fragmentations": 1, "precision": 1.0, "recall": None}
    summary = {
        "dropped": {}, "frames_sent": 1, "frames_answered": 1, "detections": 0, "duration_s": 1.0, "fps": 1.0,
        "latency_ms": {"p50": 1.0, "p95": 1.0, "p99": 1.0}, "server_stage_ms": {},
        "tracking": {"overall": scores, "cameras": {"front": scores}},
    }
    lines = format_table(summary).splitlines()
    assert lines[-2:] == ["", "tracking  MOTA n/a  IDF1 0.5000  ID switches 2  fragmentations 1  precision 1.0000  "
                              "recall n/a"]
