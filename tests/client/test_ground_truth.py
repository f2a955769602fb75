"""Which ground-truth image and category a replayed frame and detection are scored against
(client.ground_truth), as the detection score (client.evaluation) and the tracking scores
(client.track_scoring) see it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.evaluation import evaluate_replay
from client.frames import FrameResult, FrameStatus, Tracks
from client.ground_truth import GroundTruthIndex
from client.sources import open_source
from client.summary import format_table
from client.track_scoring import score_tracks, tracked_frames
from perception.coco import parse_coco
from perception.errors import DataError
from perception.tracking import TrackState
from perception.types import Detections, StageTimings
from tests.client import recordings as R

CLASSES = ("car", "traffic_light")
W, H = 96, 64


def _box(seq: int) -> list[float]:
    """Where frame ``seq``'s one object is (x, y, w, h): a different place in every frame."""
    return [4.0 + 10 * seq, 8.0, 12.0, 10.0]


def _gt(frames: dict[str, int], first_file: int = 0, keys: bool = True,
        categories: tuple[str, ...] = CLASSES) -> GroundTruthIndex:
    """One "car" per image at ``_box(sequence)``; images named "<camera>/<n:06d>.jpg" with n
    counted from ``first_file``, and with camera_id + sequence fields if ``keys``."""
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for cam, n in frames.items():
        for seq in range(n):
            iid = len(images) + 1
            image: dict[str, Any] = {"id": iid, "file_name": f"{cam}/{seq + first_file:06d}.jpg", "width": W,
                                     "height": H}
            if keys:
                image.update(camera_id=cam, sequence=seq)
            images.append(image)
            box = _box(seq)
            anns.append({"id": iid, "image_id": iid, "category_id": 1, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": 0, "track_id": 1})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)]}
    return GroundTruthIndex.from_dataset(parse_coco(data, "gt.json"), Path("gt.json"))


def _answer(cam: str, seq: int, file_name: str = "", name: str = "car", class_id: int = 0) -> FrameResult:
    """A perfect detector's tracked answer to frame ``seq``; ``file_name`` as the replay records it."""
    x, y, w, h = _box(seq)
    dets = Detections(np.array([[x, y, x + w, y + h]], np.float32), np.array([0.9], np.float32),
                      np.array([class_id], np.int64))
    extra: dict[str, object] = {"file_name": file_name} if file_name else {}
    return FrameResult(cam, seq, 0, FrameStatus.OK, "", W, H, dets, (name,), StageTimings(), extra=extra,
                       tracks=Tracks(np.array([1], np.int64), (TrackState.CONFIRMED,)))


def test_frames_of_a_recording_match_ground_truth_numbered_from_1_by_camera_and_sequence(tmp_path: Path) -> None:
    """An MCAP replayed against ground truth whose files are numbered from 1 (ffmpeg's %06d.jpg):
    its frames carried "<camera>/<seq:06d>.jpg", the name of the image after theirs, and a
    perfect detector scored map50 0.5 and MOTA 0.15."""
    frames = list(open_source(R.write_mcap_ros2(tmp_path / "d.mcap", cameras=("front",), n=4)))
    gt = _gt({"front": 4}, first_file=1)
    assert [gt.image_id(f.camera_id, f.sequence, f.file_name) for f in frames] == [1, 2, 3, 4]
    answers = [_answer(f.camera_id, f.sequence, f.file_name) for f in frames]
    kpi = evaluate_replay(answers, gt)
    assert (kpi["map50"], kpi["recall"], kpi["frames_evaluated"]) == (pytest.approx(1.0), pytest.approx(1.0), 4)
    assert score_tracks(tracked_frames(answers), gt).overall.mota == 1.0


def test_a_made_up_name_finds_no_image_of_a_camera_the_ground_truth_has_keys_for() -> None:
    """The "<camera>/<seq:06d>.jpg" guess is for ground truth without camera_id + sequence only:
    where it has them, a frame it has no image for is no frame of it."""
    keyed = _gt({"front": 3}, first_file=1)
    assert keyed.image_id("front", 3) is None  # "front/000003.jpg" is sequence 2's image
    plain = _gt({"front": 3}, keys=False)
    assert plain.image_id("front", 2) == 3  # without keys the name is all there is


def test_two_frames_matching_one_image_are_an_error() -> None:
    """A saved replay whose records carry made-up names, against ground truth numbered from 1:
    frame 0 finds image 1 by its position, frame 1 by its name. Scored twice, silently, before."""
    gt = _gt({"front": 3}, first_file=1)
    answers = [_answer("front", s, f"front/{s:06d}.jpg") for s in range(3)]
    with pytest.raises(DataError, match=r"frames front/0 \(front/000000.jpg\) and front/1 \(front/000001.jpg\) both "
                                        r"match ground-truth image 1 \(front/000001.jpg\)"):
        evaluate_replay(answers, gt)
    with pytest.raises(DataError, match="both match ground-truth image 1"):
        score_tracks(tracked_frames(answers), gt)


def test_class_names_match_categories_whatever_their_case_spaces_and_underscores() -> None:
    """Categories "Car" and "Traffic Light" for the model's "car" and "traffic_light": every
    detection was left out, silently (map50 0)."""
    gt = _gt({"front": 3}, categories=("Car", "Traffic Light"))
    answers = [_answer("front", s) for s in range(3)]
    kpi = evaluate_replay(answers, gt)
    assert kpi["map50"] == pytest.approx(1.0) and kpi["unknown_class_detections"] == 0
    assert kpi["classes_matched_by"] == "name"
    assert gt.category_id("traffic_light") == 2 and gt.category_id("TRAFFIC-LIGHT") == 2
    assert score_tracks(tracked_frames(answers), gt).overall.mota == 1.0


def test_classes_named_otherwise_go_by_class_id_and_unknown_ones_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    """No detection's class name is a category's: classes go by id, in category id order (as the
    build maps them), with a warning. Where some are, the others are left out and counted."""
    gt = _gt({"front": 3}, categories=("vehicle", "signal"))
    kpi = evaluate_replay([_answer("front", s) for s in range(3)], gt)
    assert kpi["map50"] == pytest.approx(1.0) and kpi["classes_matched_by"] == "class id"
    assert any("classes are matched by class id" in r.getMessage() for r in caplog.records)
    mixed = [_answer("front", 0), _answer("front", 1, name="bus", class_id=0), _answer("front", 2)]
    kpi = evaluate_replay(mixed, _gt({"front": 3}))
    assert kpi["unknown_class_detections"] == 1 and kpi["classes_matched_by"] == "name"
    table = format_table({"frames_sent": 3, "frames_answered": 3, "dropped": {}, "detections": 3, "duration_s": 1.0,
                          "fps": 3.0, "latency_ms": {"p50": 1.0, "p95": 1.0, "p99": 1.0}, "server_stage_ms": {},
                          "kpi": kpi})
    assert "detections left out, of a class the ground truth does not have: 1" in table


def test_tracking_counts_every_ground_truth_image_not_scored_as_the_detection_score_does() -> None:
    """Ground truth without camera_id (an annotation tool's export): gt_frames_not_scored was 0
    whatever was left out."""
    gt = _gt({"front": 5, "rear": 5}, keys=False)
    answers = [_answer("front", s, f"front/{s:06d}.jpg") for s in range(2)]
    report = score_tracks(tracked_frames(answers), gt)
    assert report.gt_frames_not_scored == 8 == evaluate_replay(answers, gt)["gt_images_not_replayed"]


def test_a_class_the_ground_truth_lacks_is_left_out_when_the_model_names_one_it_has() -> None:
    """Whether classes go by name or by id was judged on the names detected alone: a model of
    car and truck that detected only trucks on ground truth of cars and pedestrians had its
    trucks scored as pedestrians (class id 1), false positives in the KPI and in MOTA."""
    gt = _gt({"front": 2}, categories=("car", "pedestrian"))
    trucks = [_answer("front", s, name="truck", class_id=1) for s in range(2)]
    kpi = evaluate_replay(trucks, gt, model_classes=("car", "truck"))
    assert kpi["classes_matched_by"] == "name" and kpi["unknown_class_detections"] == 2
    report = score_tracks(tracked_frames(trucks), gt, model_classes=("car", "truck"))
    assert report.unknown_class_detections == 2 and report.overall.false_positives == 0
    assert evaluate_replay(trucks, gt)["classes_matched_by"] == "class id"  # without the list, as before


def test_the_model_list_is_used_only_for_answers_of_that_model() -> None:
    """The list is read when the replay begins: a model swapped in mid-replay (another version
    on the answers) may name other classes, so scoring falls back to the names answered."""
    import dataclasses

    from client.evaluation import classes_of_answers

    answers = [dataclasses.replace(_answer("front", s), model_version="1.0.0") for s in range(2)]
    assert classes_of_answers(answers, ("car", "truck"), "1.0.0", "read first") == ("car", "truck")
    swapped = [answers[0], dataclasses.replace(answers[1], model_version="2.0.0")]
    assert classes_of_answers(swapped, ("car", "truck"), "1.0.0", "read first") == ()
    dropped = dataclasses.replace(answers[1], model_version="2.0.0", status=FrameStatus.EXPIRED)
    assert classes_of_answers([answers[0], dropped], ("car", "truck"), "1.0.0", "read first") == ("car", "truck")
    record = swapped[1].to_json_dict()  # the JSONL says which model answered each frame
    assert (record["model_version"], FrameResult.from_json_dict(record).model_version) == ("2.0.0", "2.0.0")
    assert "model_version" not in _answer("front", 0).to_json_dict()  # a server that did not say: as before
