"""Tracking scores of a replay (client.track_scoring) against hand-computed numbers, and the
rules the scoring applies before motmetrics sees a box."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.ground_truth import GroundTruthIndex
from client.track_scoring import TrackedFrame, load_tracked_frames, score_tracks
from perception.coco import parse_coco
from perception.errors import DataError, InvalidInputError
from perception.tracking import TrackState

CLASSES = ["car", "pedestrian"]


def _gt(boxes: dict[tuple[str, int], list[tuple[int, int, list[float]]]], frames: dict[str, int]) -> GroundTruthIndex:
    """A COCO ground truth: ``boxes[(camera, sequence)]`` = [(track id, category id, [x, y, w, h])]."""
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for cam, n in frames.items():
        for seq in range(n):
            iid = len(images) + 1
            images.append({"id": iid, "file_name": f"{cam}/{seq:06d}.jpg", "width": 640, "height": 360,
                           "camera_id": cam, "sequence": seq})
            for tid, cat, box in boxes.get((cam, seq), []):
                anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cat, "bbox": box,
                             "area": box[2] * box[3], "iscrowd": 0, "track_id": tid})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    return GroundTruthIndex.from_dataset(parse_coco(data, "gt.json"), Path("gt.json"))


def _frame(cam: str, seq: int, dets: list[tuple[int, str, list[float]]]) -> TrackedFrame:
    """dets: (track id, class name, [x, y, w, h])."""
    boxes = np.array([[x, y, x + w, y + h] for _, _, (x, y, w, h) in dets], np.float32).reshape(-1, 4)
    names = tuple(name for _, name, _ in dets)
    return TrackedFrame(cam, seq, boxes, np.array([CLASSES.index(n) for n in names], np.int64),
                        np.array([t for t, _, _ in dets], np.int64), names)


def _hand_case() -> tuple[GroundTruthIndex, list[TrackedFrame]]:
    """Two objects over five frames of one camera.

    ground truth: A (car, track 11) in frames 0-4, moving right; B (pedestrian, track 22) in
    frames 0-3, moving left.
    tracker: track 1 on A in frames 0, 1, 3, 4 (missed in 2, so A's track is fragmented once; an
    untracked box on A in frame 2 must not count); track 2 on B in frames 0-2, track 3 on B in
    frame 3 (one ID switch); track 4 in frame 4 where nothing is (one false positive).

    By hand: 9 ground-truth boxes; 8 matched (the switch included), 1 miss, 1 false positive,
    1 switch, 1 fragmentation. MOTA = 1 - (1 + 1 + 1) / 9 = 2/3. Precision = 8 / (8 + 1) = 8/9,
    recall = 8 / 9. IDs: the best one-to-one pairing is A-1 (4 boxes together) and B-2 (3), so
    IDTP = 7 of 9 ground-truth and 9 tracked boxes: IDF1 = 2 * 7 / (9 + 9) = 7/9 = IDP = IDR.
    """
    def a(f: int) -> list[float]:
        return [10.0 + 10 * f, 10.0, 40.0, 30.0]

    def b(f: int) -> list[float]:
        return [200.0 - 10 * f, 50.0, 20.0, 50.0]

    gt = _gt({("front", f): [(11, 1, a(f))] + ([(22, 2, b(f))] if f < 4 else []) for f in range(5)}, {"front": 5})

    def near(box: list[float]) -> list[float]:
        return [box[0] + 2, box[1] + 1, box[2], box[3]]  # IoU about 0.85 with the ground truth

    frames = [
        _frame("front", 0, [(1, "car", near(a(0))), (2, "pedestrian", near(b(0)))]),
        _frame("front", 1, [(1, "car", near(a(1))), (2, "pedestrian", near(b(1)))]),
        _frame("front", 2, [(0, "car", near(a(2))), (2, "pedestrian", near(b(2)))]),
        _frame("front", 3, [(1, "car", near(a(3))), (3, "pedestrian", near(b(3)))]),
        _frame("front", 4, [(1, "car", near(a(4))), (4, "car", [400.0, 10.0, 40.0, 30.0])]),
    ]
    return gt, frames


def test_hand_computed_case() -> None:
    gt, frames = _hand_case()
    report = score_tracks(frames, gt)
    s = report.cameras["front"]
    assert (s.frames, s.gt_boxes, s.gt_tracks, s.tracked_boxes) == (5, 9, 2, 9)
    assert (s.true_positives, s.misses, s.false_positives, s.id_switches, s.fragmentations) == (8, 1, 1, 1, 1)
    assert s.mota == pytest.approx(2 / 3)
    assert s.precision == pytest.approx(8 / 9) and s.recall == pytest.approx(8 / 9)
    assert s.idf1 == pytest.approx(7 / 9) and s.idp == pytest.approx(7 / 9) and s.idr == pytest.approx(7 / 9)
    assert 0.8 < s.mean_iou < 0.9
    assert report.untracked_detections == 1 and report.unknown_class_detections == 0
    assert report.overall == s  # one camera: the overall is that camera
    assert report.to_dict()["overall"]["mota"] == pytest.approx(2 / 3)


def test_ground_truth_under_min_height_is_dont_care() -> None:
    """KITTI's convention, by hand. Three frames of one camera:

    ground truth: car A (track 11, 30 px tall) in frames 0-2; car C (track 33, 6 px tall, far
    away) in frames 0-2.
    tracker: track 1 on A in every frame; track 5 on C in frame 0 only; track 6, a 5 px car where
    nothing is, in frame 1; track 7, a 30 px car where nothing is, in frame 2.

    Every box: 6 ground-truth boxes, 4 matched, 2 misses (C), 2 false positives: MOTA 1/3.
    Under 10 px don't care: C's 3 boxes leave, and so do track 5 (on C) and track 6 (itself
    under 10 px); track 7 stays a false positive. 3 boxes, 3 matched, 1 false positive: MOTA 2/3.
    """
    def a(f: int) -> list[float]:
        return [10.0 + 10 * f, 10.0, 40.0, 30.0]

    c = [300.0, 100.0, 8.0, 6.0]
    gt = _gt({("front", f): [(11, 1, a(f)), (33, 1, c)] for f in range(3)}, {"front": 3})
    frames = [
        _frame("front", 0, [(1, "car", a(0)), (5, "car", c)]),
        _frame("front", 1, [(1, "car", a(1)), (6, "car", [500.0, 200.0, 7.0, 5.0])]),
        _frame("front", 2, [(1, "car", a(2)), (7, "car", [400.0, 200.0, 40.0, 30.0])]),
    ]
    every = score_tracks(frames, gt).overall
    assert (every.gt_boxes, every.true_positives, every.misses, every.false_positives) == (6, 4, 2, 2)
    assert every.mota == pytest.approx(1 / 3)
    report = score_tracks(frames, gt, min_gt_height=10)
    o = report.overall
    assert (o.gt_boxes, o.gt_tracks, o.true_positives, o.misses, o.false_positives) == (3, 1, 3, 0, 1)
    assert o.mota == pytest.approx(2 / 3) and o.precision == pytest.approx(3 / 4) and o.recall == pytest.approx(1.0)
    assert (report.dont_care_gt_boxes, report.dont_care_detections) == (3, 2)
    assert report.to_dict()["min_gt_height"] == 10
    # A detection that could match a kept box stays, however small the ignored box beside it.
    small_kept = _gt({("front", 0): [(11, 1, [10.0, 10.0, 12.0, 12.0]), (33, 1, [10.0, 10.0, 12.0, 9.0])]},
                     {"front": 1})
    r = score_tracks([_frame("front", 0, [(1, "car", [10.0, 10.0, 12.0, 12.0])])], small_kept, min_gt_height=10)
    assert (r.overall.true_positives, r.overall.false_positives, r.dont_care_detections) == (1, 0, 0)
    with pytest.raises(InvalidInputError, match="min_gt_height"):
        score_tracks(frames, gt, min_gt_height=-1)


def test_confirmed_only_leaves_new_tracks_out() -> None:
    """The hand case with states: tracks 1 and 2 are NEW in frame 0 (born there), 3 in frame 3
    and 4 in frame 4; the rest CONFIRMED. Confirmed only, by hand: A matched in frames 1, 3, 4
    and B in 1, 2 (5 of 9; A's frame-2 gap is still a fragmentation, B's frame-3 miss after its
    last match is none), 4 misses, no false positive, no switch. MOTA = 1 - 4/9 = 5/9; IDTP = 5
    of 9 ground-truth and 5 tracked boxes: IDF1 = 2 * 5 / (9 + 5) = 5/7; precision 1, recall 5/9."""
    gt, frames = _hand_case()
    born = {(0, 1), (0, 2), (3, 3), (4, 4)}  # (frame, track)
    frames = [dataclasses.replace(f, track_states=tuple(
        None if t == 0 else TrackState.NEW if (f.sequence, t) in born else TrackState.CONFIRMED
        for t in f.track_ids.tolist())) for f in frames]
    assert score_tracks(frames, gt).overall == score_tracks(_hand_case()[1], gt).overall  # states alone change nothing
    report = score_tracks(frames, gt, confirmed_only=True)
    s = report.overall
    assert (s.true_positives, s.misses, s.false_positives, s.id_switches, s.fragmentations) == (5, 4, 0, 0, 1)
    assert s.mota == pytest.approx(5 / 9) and s.idf1 == pytest.approx(5 / 7)
    assert s.precision == 1.0 and s.recall == pytest.approx(5 / 9)
    assert report.unconfirmed_detections == 4 and report.untracked_detections == 1
    with pytest.raises(DataError, match="no track states"):
        score_tracks(_hand_case()[1], gt, confirmed_only=True)


def test_classes_must_agree_to_match() -> None:
    gt = _gt({("front", 0): [(1, 1, [10.0, 10.0, 40.0, 30.0])]}, {"front": 1})
    wrong = _frame("front", 0, [(5, "pedestrian", [10.0, 10.0, 40.0, 30.0])])
    s = score_tracks([wrong], gt).overall
    assert (s.true_positives, s.misses, s.false_positives) == (0, 1, 1) and s.mota == pytest.approx(-1.0)
    # Without names, class ids map through the categories in id order: index 0 is category 1, "car".
    by_id = TrackedFrame("front", 0, wrong.boxes, np.array([0], np.int64), np.array([5], np.int64))
    assert score_tracks([by_id], gt).overall.true_positives == 1


def test_cameras_are_separate_sequences_and_sum_overall() -> None:
    box = [10.0, 10.0, 40.0, 30.0]
    gt = _gt({("front", 0): [(7, 1, box)], ("front", 1): [(7, 1, box)],
              ("rear", 0): [(7, 1, box)], ("rear", 1): [(7, 1, box)]}, {"front": 2, "rear": 2})
    # The same track id 1 in both cameras: two tracks, no switch; rear misses its second frame.
    frames = [_frame("rear", 0, [(1, "car", box)]), _frame("front", 0, [(1, "car", box)]),
              _frame("front", 1, [(1, "car", box)]), _frame("rear", 1, [])]
    report = score_tracks(frames, gt)
    assert list(report.cameras) == ["front", "rear"]
    assert report.cameras["front"].mota == 1.0 and report.cameras["front"].idf1 == 1.0
    assert report.cameras["rear"].recall == 0.5 and report.cameras["rear"].precision == 1.0
    o = report.overall
    assert (o.frames, o.gt_boxes, o.gt_tracks, o.true_positives, o.misses, o.id_switches) == (4, 4, 2, 3, 1, 0)
    assert o.mota == pytest.approx(0.75) and o.idf1 == pytest.approx(2 * 3 / (4 + 3))


def test_only_the_frames_given_are_scored() -> None:
    box = [10.0, 10.0, 40.0, 30.0]
    gt = _gt({("front", f): [(7, 1, box)] for f in range(4)}, {"front": 4})
    # Every other frame sent (and a frame the ground truth does not have): the gaps are no misses.
    frames = [_frame("front", 0, [(1, "car", box)]), _frame("front", 2, [(1, "car", box)]),
              _frame("front", 99, [(1, "car", box)])]
    report = score_tracks(frames, gt)
    s = report.overall
    assert (s.frames, s.gt_boxes, s.misses, s.fragmentations) == (2, 2, 0, 0) and s.mota == 1.0
    assert report.frames_without_gt == 1 and report.gt_frames_not_scored == 2


def test_frames_match_ground_truth_by_file_name_as_the_detection_score_does() -> None:
    """Ground truth with no camera_id / sequence fields whose images are named from 1 (the
    MOTChallenge style), replayed as an image folder (sequences from 0): each frame is its
    file's image. Tracking matched by "<camera>/<sequence>.jpg" alone, so every frame was scored
    against the image before it, where the detection score matched the right one."""
    box = [10.0, 10.0, 40.0, 30.0]
    data = {"images": [{"id": 1, "file_name": "front/000001.jpg", "width": 640, "height": 360},
                       {"id": 2, "file_name": "front/000002.jpg", "width": 640, "height": 360}],
            "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": box, "area": box[2] * box[3],
                             "iscrowd": 0, "track_id": 7}],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    gt = GroundTruthIndex.from_dataset(parse_coco(data, "gt.json"), Path("gt.json"))
    frames = [dataclasses.replace(_frame("front", 0, []), file_name="front/000001.jpg"),
              dataclasses.replace(_frame("front", 1, [(1, "car", box)]), file_name="front/000002.jpg")]
    s = score_tracks(frames, gt).overall
    assert (s.frames, s.gt_boxes, s.true_positives, s.false_positives, s.misses) == (2, 1, 1, 0, 0)


def test_a_bare_file_name_two_cameras_share_finds_no_image_by_itself() -> None:
    """A rear/ folder replayed alone names its frames "000000.jpg": against ground truth of two
    cameras without camera ids, that name is front's and rear's both, so the camera and
    sequence decide (the first image of the name used to win: front's)."""
    data = {"images": [{"id": 1, "file_name": "front/000000.jpg", "width": 640, "height": 360},
                       {"id": 2, "file_name": "rear/000000.jpg", "width": 640, "height": 360},
                       {"id": 3, "file_name": "rear/only_here.jpg", "width": 640, "height": 360}],
            "annotations": [], "categories": [{"id": 1, "name": "car"}]}
    gt = GroundTruthIndex.from_dataset(parse_coco(data, "gt.json"), Path("gt.json"))
    assert gt.image_id("rear", 0, "000000.jpg") == 2
    assert gt.image_id("rear", 5, "only_here.jpg") == 3  # a name one image has still finds it
    # The name, not the position: rear's frame 4 named 000000.jpg (a folder numbered otherwise).
    assert gt.image_id("rear", 4, "000000.jpg") == 2


def test_a_frame_of_a_file_is_that_file_s_image_before_its_position() -> None:
    """Ground truth with camera_id / sequence fields (extracted frames), replayed from a folder
    with frames removed: the folder numbers its frames from 0, so front/000005.jpg comes as
    sequence 0. The position used to win, scoring it against front/000000.jpg's boxes."""
    data = {"images": [{"id": 1, "file_name": "front/000000.jpg", "width": 640, "height": 360,
                        "camera_id": "front", "sequence": 0},
                       {"id": 2, "file_name": "front/000005.jpg", "width": 640, "height": 360,
                        "camera_id": "front", "sequence": 5}],
            "annotations": [], "categories": [{"id": 1, "name": "car"}]}
    gt = GroundTruthIndex.from_dataset(parse_coco(data, "gt.json"), Path("gt.json"))
    assert gt.image_id("front", 0, "front/000005.jpg") == 2
    assert gt.image_id("front", 0, "000005.jpg") == 2  # a bare name under its camera's folder
    assert gt.image_id("front", 5) == 2 and gt.image_id("front", 0) == 1  # no file: the position
    assert gt.image_id("front", 0, "front/not_in_gt.jpg") == 1


def test_empty_frames_and_undefined_rates() -> None:
    gt = _gt({("front", 0): [(7, 1, [10.0, 10.0, 40.0, 30.0])]}, {"front": 2})
    report = score_tracks([_frame("front", 0, []), _frame("front", 1, [])], gt)
    s = report.overall
    assert (s.gt_boxes, s.tracked_boxes, s.misses, s.recall, s.mota) == (1, 0, 1, 0.0, 0.0)
    assert math.isnan(s.precision) and math.isnan(s.mean_iou)
    assert report.to_dict()["overall"]["precision"] is None  # JSON has no NaN
    # No ground truth at all in the frames scored: recall and MOTA are undefined, not 0 or 1.
    fp = score_tracks([_frame("front", 1, [(3, "car", [1.0, 1.0, 5.0, 5.0])])], gt).overall
    assert fp.false_positives == 1 and math.isnan(fp.recall) and math.isnan(fp.mota) and fp.precision == 0.0


def test_perfect_tracks_on_the_bundled_drive(repo_root: Path) -> None:
    """The drive's own ground truth as the tracker's answer scores perfectly."""
    path = repo_root / "assets" / "drives" / "demo" / "gt.json"
    gt = GroundTruthIndex.load(path)
    raw = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in raw["categories"]}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in raw["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    frames = []
    for im in raw["images"]:
        anns = by_image.get(im["id"], [])
        frames.append(_frame(im["camera_id"], im["sequence"], []) if not anns else TrackedFrame(
            im["camera_id"], im["sequence"],
            np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32),
            np.array([a["category_id"] - 1 for a in anns], np.int64),
            np.array([a["track_id"] + 1000 for a in anns], np.int64), tuple(names[a["category_id"]] for a in anns)))
    report = score_tracks(frames, gt)
    assert set(report.cameras) == {"front", "rear"}
    o = report.overall
    assert (o.mota, o.idf1, o.precision, o.recall, o.id_switches, o.fragmentations) == (1.0, 1.0, 1.0, 1.0, 0, 0)
    assert o.gt_boxes == len(raw["annotations"]) and o.frames == len(raw["images"])


def test_replay_jsonl_with_track_ids(tmp_path: Path) -> None:
    gt, frames = _hand_case()

    def record(f: TrackedFrame) -> dict[str, Any]:
        return {"camera_id": f.camera_id, "sequence": f.sequence, "status": "OK",
                "detections": [
                    {"box": b.tolist(), "score": 0.9, "class_id": int(c), "class_name": n, "track_id": int(t),
                     "track_state": "" if t == 0 else "CONFIRMED"}
                    for b, c, n, t in zip(f.boxes, f.class_ids, f.class_names, f.track_ids, strict=True)
                ]}

    lines = [record(f) for f in frames]
    lines.insert(2, {"camera_id": "front", "sequence": 9, "status": "DROPPED_STALE", "detections": []})
    path = tmp_path / "replay.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    loaded = load_tracked_frames(path)
    assert [f.sequence for f in loaded] == [0, 1, 2, 3, 4]
    assert loaded[2].track_states == (None, TrackState.CONFIRMED)
    assert score_tracks(loaded, gt).overall == score_tracks(frames, gt).overall
    # A replay without tracking has no track ids: refused rather than scored as all misses.
    for r in lines:
        for d in r["detections"]:
            d.pop("track_id")
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(DataError, match="no detection carries a track_id"):
        load_tracked_frames(path)
    path.write_text(json.dumps({"camera_id": "front", "sequence": 0, "detections": [{"box": [1, 2]}]}) + "\n")
    with pytest.raises(DataError, match=r"replay.jsonl:1: malformed"):
        load_tracked_frames(path)


def test_misuse_is_refused() -> None:
    gt, frames = _hand_case()
    with pytest.raises(DataError, match="given twice"):
        score_tracks(frames + frames[:1], gt)
    box = [10.0, 10.0, 40.0, 30.0]
    with pytest.raises(DataError, match="track id on more than one box"):
        score_tracks([_frame("front", 0, [(1, "car", box), (1, "car", box)])], gt)
    with pytest.raises(DataError, match="no tracked frame matches"):
        score_tracks([_frame("side", 0, [])], gt)
    with pytest.raises(InvalidInputError, match="min_iou"):
        score_tracks(frames, gt, min_iou=0.0)
    with pytest.raises(InvalidInputError, match="negative"):
        _frame("front", 0, [(-1, "car", box)])
    with pytest.raises(InvalidInputError, match="inconsistent"):
        TrackedFrame("front", 0, np.zeros((2, 4), np.float32), np.zeros(2, np.int64), np.zeros(1, np.int64))
    raw = dict(gt.dataset.raw)
    raw["annotations"] = [dict(a) for a in raw["annotations"]]
    del raw["annotations"][3]["track_id"]
    untracked_gt = GroundTruthIndex.from_dataset(parse_coco(raw, "gt.json"), Path("gt.json"))
    with pytest.raises(DataError, match=r"gt.json: annotations\[3\] \(id 4\) needs a non-negative integer"):
        score_tracks(frames, untracked_gt)
