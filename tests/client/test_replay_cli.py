"""`perception replay` and `perception compare` end to end against a real server on loopback."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import pytest

from perception.cli import main
from tests.client import recordings as R
from tests.tiny_model import CLASSES


def _jsonl(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _replay(*args: str) -> int:
    return main(["replay", *args, "--no-progress"])


def test_replay_mcap_two_cameras_max_rate(tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]) -> None:
    src = R.write_mcap_ros2(tmp_path / "drive.mcap", cameras=("front", "rear"), n=6, raw_camera="rear")
    out, summ = tmp_path / "out.jsonl", tmp_path / "summary.json"
    assert _replay(str(src), "--server", server, "--out", str(out), "--json-out", str(summ), "--max-rate") == 0
    recs = _jsonl(out)
    assert len(recs) == 12
    for cam in ("front", "rear"):
        seqs = [r["sequence"] for r in recs if r["camera_id"] == cam]
        assert seqs == list(range(6)), "answers come back in order per camera"
    r0 = recs[0]
    assert r0["status"] == "OK" and (r0["image_width"], r0["image_height"]) == (96, 64)
    assert set(r0["timings"]) == {"queue_us", "preprocess_us", "inference_us", "postprocess_us", "total_us",
                                  "batch_size"}
    assert r0["latency_ms"] > 0
    assert r0["model_version"] and r0["model_variant"]  # which model answered (it changes on a swap)
    for d in (x for r in recs for x in r["detections"]):
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 64 and d["class_name"] == CLASSES[d["class_id"]]
    s = json.loads(summ.read_text())
    assert s["frames_sent"] == 12 and s["frames_answered"] == 12 and s["dropped"] == {}
    assert s["detections"] == sum(len(r["detections"]) for r in recs)
    assert set(s["per_camera"]) == {"front", "rear"} and s["per_camera"]["rear"]["frames"] == 6
    assert set(s["server_stage_ms"]) >= {"queue", "preprocess", "inference", "postprocess"}
    assert s["latency_ms"]["p50"] <= s["latency_ms"]["p95"] <= s["latency_ms"]["p99"]
    printed = capsys.readouterr().out
    assert "frames sent 12  answered 12" in printed and "client round trip" in printed and "server inference" in printed


def test_replay_mp4_in_real_time_with_annotated_video(tmp_path: Path, server: str) -> None:
    src = R.write_mp4(tmp_path / "front.mp4", n=6, fps=20.0)  # 250 ms of video
    out, summ, video = tmp_path / "o.jsonl", tmp_path / "s.json", tmp_path / "annotated.mp4"
    assert _replay(str(src), "--server", server, "--out", str(out), "--json-out", str(summ),
                   "--video-out", str(video)) == 0
    s = json.loads(summ.read_text())
    assert s["frames_answered"] == 6 and s["duration_s"] >= 0.25  # recorded timing was respected
    assert [r["camera_id"] for r in _jsonl(out)] == ["front"] * 6
    cap = cv2.VideoCapture(str(video))
    n = 0
    while True:
        ok, img = cap.read()
        if not ok:
            break
        n += 1
        assert img.shape == (64, 96, 3)
    assert n == 6


def test_replay_folder_with_a_corrupt_image(tmp_path: Path, server: str) -> None:
    root = R.write_folder(tmp_path / "cam", n=5)
    (root / "000002.jpg").write_bytes((root / "000002.jpg").read_bytes()[:40])  # truncated JPEG
    out, summ = tmp_path / "o.jsonl", tmp_path / "s.json"
    assert _replay(str(root), "--server", server, "--out", str(out), "--json-out", str(summ), "--max-rate") == 0
    recs = _jsonl(out)
    assert [r["status"] for r in recs] == ["OK", "OK", "INVALID", "OK", "OK"]
    assert recs[2]["message"] and recs[2]["detections"] == []
    assert json.loads(summ.read_text())["dropped"] == {"invalid": 1}


def test_replay_folder_with_an_empty_and_an_undecodable_file_goes_on(tmp_path: Path, server: str) -> None:
    """A BMP that does not decode, or an empty file, ended the replay there ("not a readable
    image"), the files after it without a record. Sent as they are, they are answered INVALID."""
    root = tmp_path / "cam"
    root.mkdir()
    for i in range(5):
        cv2.imwrite(str(root / f"{i:03d}.bmp"), R.scene(i))
    (root / "001.bmp").write_bytes(b"BM not really")
    (root / "003.bmp").write_bytes(b"")
    out, summ = tmp_path / "o.jsonl", tmp_path / "s.json"
    assert _replay(str(root), "--server", server, "--out", str(out), "--json-out", str(summ), "--max-rate") == 0
    recs = _jsonl(out)
    assert [(r["file_name"], r["status"]) for r in recs] == [
        ("000.bmp", "OK"), ("001.bmp", "INVALID"), ("002.bmp", "OK"), ("003.bmp", "INVALID"), ("004.bmp", "OK")]
    assert all(recs[i]["message"] for i in (1, 3))
    assert json.loads(summ.read_text())["dropped"] == {"invalid": 2}


def test_replay_mcap_with_an_empty_and_a_damaged_image_message_goes_on(tmp_path: Path, server: str) -> None:
    """A CompressedImage payload nothing could read ended the replay at that message, the
    messages after it without a record, where a damaged image file in a folder is answered
    INVALID and the replay goes on. Now the recording's is too."""
    from mcap_ros2.writer import Writer

    payloads = [R.jpeg(R.scene(0)), b"\x00not an image", R.jpeg(R.scene(2)), b"", R.jpeg(R.scene(4))]
    src = tmp_path / "d.mcap"
    with open(src, "wb") as f:
        w = Writer(f)
        comp = w.register_msgdef("sensor_msgs/msg/CompressedImage", R.COMPRESSED_DEF)
        for i, data in enumerate(payloads):
            ts = R.T0_NS + i * 50_000_000
            stamp = {"sec": ts // 10**9, "nanosec": ts % 10**9}
            w.write_message("/cameras/front/image/compressed", comp,
                            {"header": {"stamp": stamp, "frame_id": "front"}, "format": "jpeg", "data": data},
                            log_time=ts)
        w.finish()
    out, summ = tmp_path / "o.jsonl", tmp_path / "s.json"
    assert _replay(str(src), "--server", server, "--out", str(out), "--json-out", str(summ), "--max-rate") == 0
    recs = _jsonl(out)
    assert [(r["sequence"], r["status"]) for r in recs] == [
        (0, "OK"), (1, "INVALID"), (2, "OK"), (3, "INVALID"), (4, "OK")]
    assert all(recs[i]["message"] for i in (1, 3))
    assert json.loads(summ.read_text())["dropped"] == {"invalid": 2}


def test_a_looped_replay_keeps_no_file_names_unless_it_keeps_results(tmp_path: Path, server: str) -> None:
    """--loop without --gt keeps no results: it kept every frame's file name all the same."""
    from client.config import ClientConfig
    from client.detector_client import DetectorClient
    from client.pacing import Pacing
    from client.replay import Replay, ReplayConfig
    from client.sources import open_source

    src = open_source(R.write_folder(tmp_path / "cam", n=3))
    with DetectorClient(ClientConfig(targets=(server,), window=2)) as client:
        for keep in (False, True):
            config = ReplayConfig(pacing=Pacing(speed=None, loop=True, max_frames=9), keep_results=keep)
            out = Replay(client, src, config).run()
            assert out.error is None and out.stats.frames_answered == 9
            assert len(out.results) == len(out.file_names) == (9 if keep else 0)
    assert out.file_names[("cam", 4)] == "000001.jpg"  # the second lap numbers on


def test_scoring_a_replay_with_no_frame_answered_ok_is_an_error(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --gt, a replay where no frame was answered OK has nothing to score: it fails and
    says how the frames ended (it exited 0 when nothing was answered at all, and blamed the
    ground truth's image names when every answer was an error)."""
    root = R.write_folder(tmp_path / "cam", n=3)
    for f in root.iterdir():
        f.write_bytes(f.read_bytes()[:40])  # every image truncated: INVALID
    gt = {"images": [{"id": i + 1, "file_name": f"cam/{i:06d}.jpg", "width": 96, "height": 64} for i in range(3)],
          "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    summ = tmp_path / "s.json"
    assert _replay(str(root), "--server", server, "--json-out", str(summ), "--gt", str(tmp_path / "gt.json"),
                   "--max-rate") != 0
    assert "no frame was answered OK (3 INVALID)" in capsys.readouterr().err
    assert "3 INVALID" in json.loads(summ.read_text())["kpi_error"]


def test_frames_of_another_size_than_their_ground_truth_are_an_error(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Boxes come back in the frame's pixels: scored against ground truth labelled at another
    resolution they land in the wrong place. That is an error naming a frame, not a KPI near 0."""
    root = R.write_folder(tmp_path / "cam", n=3)
    gt = {"images": [{"id": i + 1, "file_name": f"cam/{i:06d}.jpg", "width": 192, "height": 128} for i in range(3)],
          "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    assert _replay(str(root), "--server", server, "--gt", str(tmp_path / "gt.json"), "--max-rate") != 0
    err = capsys.readouterr().err
    assert "3 replayed frames are not the size of their ground-truth image" in err and "192x128" in err, err


def test_replay_ros1_bag_with_skip_and_loop(tmp_path: Path, server: str) -> None:
    bag = R.write_bag(tmp_path / "d.bag", ros1=True, n=4)
    out = tmp_path / "o.jsonl"
    assert _replay(str(bag), "--server", server, "--out", str(out), "--max-rate", "--topic", "/side/image_raw",
                   "--skip", "1", "--loop", "--max-frames", "5") == 0
    recs = _jsonl(out)
    assert [(r["camera_id"], r["sequence"]) for r in recs] == [("side", s) for s in (0, 2, 4, 6, 8)]


@pytest.mark.parametrize("first_file", [0, 1], ids=["files-from-0", "files-from-1"])
def test_replay_with_gt_scores_like_perception_eval(tmp_path: Path, server: str, first_file: int) -> None:
    """Ground truth with camera_id + sequence, whose file names count from 0 or from 1 (ffmpeg's
    %06d.jpg): an MCAP's frames, which have no file, are found by camera and sequence. They were
    named "<camera>/<seq:06d>.jpg" and found by that name first: the image after theirs."""
    src = R.write_mcap_ros2(tmp_path / "drive.mcap", cameras=("front", "rear"), n=4)
    first = tmp_path / "first.jsonl"
    assert _replay(str(src), "--server", server, "--out", str(first), "--max-rate") == 0
    assert not any("file_name" in r for r in _jsonl(first)), "a frame of no file has no file name"
    # Ground truth = the first run's detections (2 of 3 kept, and only boxes of at least 2x2 px:
    # the random tiny model also emits sliver boxes whose IoU does not survive JSON rounding).
    # The second run must find them all.
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for k, r in enumerate(_jsonl(first), 1):
        images.append({"id": 100 + k, "file_name": f"{r['camera_id']}/{r['sequence'] + first_file:06d}.jpg",
                       "width": 96, "height": 64, "camera_id": r["camera_id"], "sequence": r["sequence"],
                       "timestamp_ns": r["capture_timestamp_ns"]})
        for j, d in enumerate(r["detections"]):
            x1, y1, x2, y2 = d["box"]
            if j % 3 == 2 or x2 - x1 < 2 or y2 - y1 < 2:
                continue
            anns.append({"id": len(anns) + 1, "image_id": 100 + k, "category_id": d["class_id"] + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    gt = {"images": images, "annotations": anns, "categories": categories}
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    summ, coco = tmp_path / "s.json", tmp_path / "results.json"
    assert _replay(str(src), "--server", server, "--json-out", str(summ), "--coco-results", str(coco),
                   "--gt", str(gt_path), "--max-rate") == 0
    kpi = json.loads(summ.read_text())["kpi"]
    assert kpi["recall"] == pytest.approx(1.0)
    assert len(anns) / sum(len(r["detections"]) for r in _jsonl(first)) - 1e-6 <= kpi["precision"] < 1.0
    assert kpi["frames_evaluated"] == 8 and kpi["gt_images_not_replayed"] == 0
    from perception.kpi import evaluate_coco

    results = json.loads(coco.read_text())
    assert {r["image_id"] for r in results} <= {im["id"] for im in images}
    assert evaluate_coco(gt, results).map50 == pytest.approx(kpi["map50"])


def test_server_down_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = R.write_folder(tmp_path / "cam", n=2)
    rc = _replay(str(src), "--server", f"127.0.0.1:{port}", "--out", str(tmp_path / "o.jsonl"),
                 "--connect-timeout", "0.5")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("perception replay: error: no server reachable at 127.0.0.1:")
    assert "Traceback" not in "\n".join(err)


def test_truncated_recording_keeps_outputs_valid(
    tmp_path: Path, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    full = R.write_mcap_ros2(tmp_path / "full.mcap", cameras=("front",), n=30, chunk_size=4096)
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    out, summ = tmp_path / "o.jsonl", tmp_path / "s.json"
    rc = _replay(str(cut), "--server", server, "--out", str(out), "--json-out", str(summ), "--max-rate")
    assert rc == 1
    assert "truncated or corrupt MCAP" in capsys.readouterr().err
    recs = _jsonl(out)
    s = json.loads(summ.read_text())
    assert 0 < len(recs) == s["frames_answered"] == s["frames_sent"] < 30


def test_unknown_topic_fails_before_connecting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = R.write_mcap_ros2(tmp_path / "d.mcap", n=2)
    assert _replay(str(src), "--server", "127.0.0.1:1", "--topic", "/lidar") == 1
    assert "unknown topic '/lidar'" in capsys.readouterr().err


def _rec(seq: int, dets: Sequence[tuple[Sequence[float], int]], status: str = "OK", latency: float = 5.0) -> dict:
    return {"camera_id": "front", "sequence": seq, "capture_timestamp_ns": seq, "status": status, "message": "",
            "image_width": 640, "image_height": 480, "latency_ms": latency,
            "timings": {"queue_us": 1, "preprocess_us": 1, "inference_us": 1, "postprocess_us": 1, "total_us": 4,
                        "batch_size": 1},
            "detections": [{"box": b, "score": 0.9, "class_id": c, "class_name": CLASSES[c]} for b, c in dets]}


def test_compare_two_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    car, bus, ped = ([10, 10, 60, 40], 0), ([100, 100, 200, 180], 2), ([300, 50, 320, 110], 3)
    a = [_rec(0, [car, bus, ped]), _rec(1, [car, bus, ped]), _rec(2, [car, bus]), _rec(3, [car])]
    b = [
        _rec(0, [car, bus, ped]),  # unchanged
        _rec(1, [([10, 10, 60, 40], 1), ([140, 100, 240, 180], 2), ([400, 400, 420, 460], 4)]),  # class, moved, swap
        _rec(2, [car, bus, ped]),  # one appeared
        _rec(3, [], status="DROPPED_STALE"),  # status changed, car vanished
    ]
    pa, pb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    pa.write_text("".join(json.dumps(r) + "\n" for r in a))
    pb.write_text("".join(json.dumps(r) + "\n" for r in b))
    report = tmp_path / "cmp.json"
    assert main(["compare", str(pa), str(pb), "--json-out", str(report)]) == 0
    rep = json.loads(report.read_text())
    t = rep["totals"]
    assert rep["frames_compared"] == 4 and rep["frames_changed"] == 3
    assert (t["unchanged"], t["class_changed"], t["moved"]) == (3 + 0 + 2 + 0, 1, 1)
    assert (t["appeared"], t["vanished"], t["status_changed"]) == (2, 2, 1)
    f1 = next(f for f in rep["frames"] if f["sequence"] == 1)
    assert f1["moved"][0]["iou"] == pytest.approx(60 * 80 / (140 * 80), abs=1e-4)
    assert f1["class_changed"][0]["a"]["class_name"] == "car" and f1["class_changed"][0]["b"]["class_name"] == "truck"
    assert "appeared 2  vanished 2  moved 1  class changed 1" in capsys.readouterr().out


def test_compare_with_gt_puts_kpi_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    car, bus = ([10, 10, 60, 40], 0), ([100, 100, 200, 180], 2)
    gt = {"images": [{"id": 7, "file_name": "front/000000.jpg", "width": 640, "height": 480,
                      "camera_id": "front", "sequence": 0}],
          "annotations": [
              {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 50, 30], "area": 1500, "iscrowd": 0},
              {"id": 2, "image_id": 7, "category_id": 3, "bbox": [100, 100, 100, 80], "area": 8000, "iscrowd": 0},
          ],
          "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "a.jsonl").write_text(json.dumps(_rec(0, [car, bus])) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(_rec(0, [car])) + "\n")
    out = tmp_path / "cmp.json"
    assert main(["compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--gt", str(tmp_path / "gt.json"),
                 "--json-out", str(out)]) == 0
    kpi = json.loads(out.read_text())["kpi"]
    assert kpi["a"]["recall"] == pytest.approx(1.0) and kpi["b"]["recall"] == pytest.approx(0.5)
    assert "recall" in capsys.readouterr().out


def test_compare_scores_with_the_model_classes_as_a_live_replay_does(tmp_path: Path) -> None:
    """Without the model's class list a saved replay was scored by the names detected alone:
    trucks only, on ground truth of car and pedestrian, went by class id (truck = id 1 =
    pedestrian), where the live replay, told the model also has car, left them out."""
    gt = {"images": [{"id": 1, "file_name": "front/000000.jpg", "width": 640, "height": 480}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 10, 50, 30], "area": 1500,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "pedestrian"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    truck = _rec(0, [([10, 10, 60, 40], 1)])
    truck["file_name"] = "front/000000.jpg"
    (tmp_path / "a.jsonl").write_text(json.dumps(truck) + "\n")
    (tmp_path / "classes.txt").write_text("car\ntruck\n")
    argv = ["compare", str(tmp_path / "a.jsonl"), str(tmp_path / "a.jsonl"), "--gt", str(tmp_path / "gt.json")]
    for extra, matched_by, unknown in (([], "class id", 0),
                                       (["--model-classes", str(tmp_path / "classes.txt")], "name", 1)):
        out = tmp_path / "cmp.json"
        assert main([*argv, *extra, "--json-out", str(out)]) == 0
        kpi = json.loads(out.read_text())["kpi"]["a"]
        assert (kpi["classes_matched_by"], kpi["unknown_class_detections"]) == (matched_by, unknown)
    (tmp_path / "empty.txt").write_text("\n")
    assert main([*argv, "--model-classes", str(tmp_path / "empty.txt")]) != 0
    assert main([*argv[:3], "--model-classes", str(tmp_path / "classes.txt")]) != 0  # nothing to score without --gt


def test_compare_takes_a_manifests_classes_only_for_runs_that_model_answered(tmp_path: Path,
                                                                             tiny_manifest: Path) -> None:
    """One list for both runs scored a run another model answered with the wrong model's
    classes; the records say which model answered, and a manifest says which model it is."""
    gt = {"images": [{"id": 1, "file_name": "front/000000.jpg", "width": 640, "height": 480}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 10, 50, 30], "area": 1500,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "pedestrian"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    truck = dict(_rec(0, [([10, 10, 60, 40], 1)]), file_name="front/000000.jpg")
    (tmp_path / "a.jsonl").write_text(json.dumps(dict(truck, model_version="0.0.1")) + "\n")  # the tiny model's
    (tmp_path / "b.jsonl").write_text(json.dumps(dict(truck, model_version="2.0.0")) + "\n")
    argv = ["compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--gt", str(tmp_path / "gt.json")]
    for given in (tiny_manifest, tiny_manifest.parent):  # the manifest, or the model's directory
        out = tmp_path / "cmp.json"
        assert main([*argv, "--model-classes", str(given), "--json-out", str(out)]) == 0
        kpi = json.loads(out.read_text())["kpi"]
        assert (kpi["a"]["classes_matched_by"], kpi["b"]["classes_matched_by"]) == ("name", "class id")
    assert main([*argv, "--model-classes", str(tmp_path / "missing.json")]) != 0


def test_compare_treats_identical_degenerate_boxes_as_unchanged(tmp_path: Path) -> None:
    flat = ([10, 0, 60, 0], 2)  # zero height: IoU is 0/0, but it is the same detection
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps(_rec(0, [flat, ([5, 5, 9, 9], 0)])) + "\n")
    out = tmp_path / "cmp.json"
    assert main(["compare", str(p), str(p), "--json-out", str(out)]) == 0
    t = json.loads(out.read_text())["totals"]
    assert (t["unchanged"], t["appeared"], t["vanished"]) == (2, 0, 0)


def test_compare_rejects_a_malformed_record_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = json.dumps(_rec(0, [([1, 1, 5, 5], 0)]))
    bad = json.dumps({"camera_id": "front", "sequence": 1, "detections": [{"score": 0.5}]})
    p = tmp_path / "a.jsonl"
    p.write_text(good + "\n" + bad + "\n")
    assert main(["compare", str(p), str(p)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("perception compare: error:") and "a.jsonl:2: malformed replay record" in err
