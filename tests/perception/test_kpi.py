"""KPI maths: parity with pycocotools on non-trivial data, and hand-checked small cases."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from typing import Any

import numpy as np
import pytest

from perception.kpi import evaluate_coco, interpolated_ap, precision_recall


def make_case(seed: int, n_img: int = 30, n_cls: int = 4) -> tuple[dict, list[dict]]:
    """Random GT (varied sizes, some crowd) and noisy predictions: jittered, mislabelled, spurious."""
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in range(n_img)]
    anns, res, aid = [], [], 1
    for im in images:
        for _ in range(int(rng.integers(0, 8))):
            w, h = rng.uniform(4, 200, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            c = int(rng.integers(1, n_cls + 1))
            anns.append({"id": aid, "image_id": im["id"], "category_id": c, "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": int(rng.random() < 0.05)})
            aid += 1
            if rng.random() < 0.8:
                j = rng.normal(0, 0.1, 4) * [w, h, w, h]
                cc = c if rng.random() < 0.85 else int(rng.integers(1, n_cls + 1))
                res.append({"image_id": im["id"], "category_id": cc, "score": float(rng.random()),
                            "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]})
        for _ in range(int(rng.integers(0, 4))):
            w, h = rng.uniform(4, 150, 2)
            res.append({"image_id": im["id"], "category_id": int(rng.integers(1, n_cls + 1)),
                        "score": float(rng.random() * 0.6), "bbox": [rng.uniform(0, 500), rng.uniform(0, 400), w, h]})
    categories = [{"id": i, "name": f"c{i}"} for i in range(1, n_cls + 1)]
    gt = {"images": images, "annotations": anns, "categories": categories}
    return gt, res


def pycocotools_stats(gt: dict, res: list[dict]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO()
        # The stub's dataset type also demands "segmentation" and "supercategory", which bbox evaluation never reads.
        cg.dataset = copy.deepcopy(gt)  # type: ignore[assignment]  # partial COCO: see above
        cg.createIndex()
        cd = cg.loadRes(copy.deepcopy(res))
        e = COCOeval(cg, cd, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_matches_pycocotools(seed: int) -> None:
    gt, res = make_case(seed)
    stats = pycocotools_stats(gt, res)
    r = evaluate_coco(json.loads(json.dumps(gt)), res)
    assert 0.05 < r.map50_95 < 0.9  # non-trivial
    assert r.map50_95 == pytest.approx(stats[0], abs=1e-3)
    assert r.map50 == pytest.approx(stats[1], abs=1e-3)
    assert r.map75 == pytest.approx(stats[2], abs=1e-3)
    for k, size in enumerate(("small", "medium", "large")):
        assert r.per_size[size]["map50_95"] == pytest.approx(stats[3 + k], abs=1e-3)


def _gt(boxes_by_img: list[list[tuple[float, float, float, float, int]]]) -> dict:
    images = [{"id": i + 1, "width": 100, "height": 100} for i in range(len(boxes_by_img))]
    anns: list[dict[str, Any]] = []
    for i, boxes in enumerate(boxes_by_img):
        for x, y, w, h, c in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c, "bbox": [x, y, w, h], "area": w * h})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}]}


def test_perfect_and_empty_predictions() -> None:
    gt = _gt([[(10, 10, 20, 20, 1), (50, 50, 30, 30, 2)]])
    perfect = [{"image_id": 1, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    r = evaluate_coco(gt, perfect)
    assert r.map50_95 == pytest.approx(1.0) and r.precision == 1.0 and r.recall == 1.0 and r.f1 == 1.0
    assert r.confusion == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    r0 = evaluate_coco(gt, [])
    assert r0.map50 == 0.0 and r0.recall == 0.0 and r0.precision == 0.0
    assert r0.confusion == [[0, 0, 1], [0, 0, 1], [0, 0, 0]]


def test_precision_recall_at_threshold_and_confusion_by_hand() -> None:
    # Two cars. Detections: car hit (0.9), car hit below threshold (0.2), a bus on car 1's place
    # at 0.8 (wrong class), a spurious car at 0.7.
    gt = _gt([[(10, 10, 20, 20, 1), (50, 50, 30, 30, 1)]])
    preds = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 30, 30], "score": 0.2},
        {"image_id": 1, "category_id": 2, "bbox": [51, 50, 30, 30], "score": 0.8},
        {"image_id": 1, "category_id": 1, "bbox": [0, 70, 10, 10], "score": 0.7},
    ]
    r = evaluate_coco(gt, preds, score_threshold=0.5)
    # Car class at >= 0.5: 2 detections (0.9 hit, 0.7 miss), 1 TP; bus: 1 FP with no bus GT.
    # Micro P/R over every detection, the bus's too (a class the frames lack has no AP, but its
    # boxes are false positives): P = 1/3, R = 1/2.
    assert r.precision == pytest.approx(1 / 3) and r.recall == pytest.approx(0.5)
    assert r.f1 == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    assert r.per_class["car"]["precision"] == pytest.approx(0.5) and "bus" not in r.per_class
    # Car AP50: ranked 0.9 TP, 0.7 FP, 0.2 TP -> precision (1, .5, .67) -> interpolated 1 up
    # to recall 0.5 (51 points) and 0.667 after (50 points).
    assert r.per_class["car"]["ap50"] == pytest.approx((51 * 1 + 50 * 2 / 3) / 101, abs=1e-9)
    # Confusion (class-agnostic at IoU 0.5, score >= 0.5): car->car 1, car 2 taken by the bus
    # detection (car->bus 1), spurious car -> background row.
    assert r.confusion == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]


@pytest.mark.parametrize(
    "gt_box, det_box",
    [
        # float32 ground truth made this IoU 0.49999...: 0.1 is not a float32 value
        ([0.1, 0.1, 10.0, 10.0], [0.1, 0.1, 10.0, 5.0]),
        # areas from the corners, (147.86 - 90.86) * (251.27 - 249.27), made it 0.49999...
        ([90.86, 249.27, 57.0, 4.0], [90.86, 249.27, 57.0, 2.0]),
    ],
)
def test_an_iou_exactly_on_a_threshold_matches_as_in_pycocotools(gt_box: list[float], det_box: list[float]) -> None:
    # The detection is the ground truth's top half: IoU 0.5 exactly, which pycocotools (float64,
    # w * h areas, IoU >= threshold) matches at 0.5 and at no higher threshold.
    gt = {"images": [{"id": 1, "width": 500, "height": 500}], "categories": [{"id": 1, "name": "car"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": gt_box, "area": 1.0}]}
    r = evaluate_coco(gt, [{"image_id": 1, "category_id": 1, "bbox": det_box, "score": 0.9}])
    assert (r.map50, r.map75, r.map50_95) == (1.0, 0.0, pytest.approx(0.1))


def test_detection_size_band_is_by_its_width_times_height() -> None:
    # A 32 x 32 detection at x = 32.02, where (32.02 + 32) - 32.02 > 32: its area is 1024, in
    # COCO's small band [0, 32**2] (pycocotools: w * h), so as an unmatched false positive it
    # counts there. Small AP: a FP at 0.9 above the TP at 0.5 -> precision 0.5 at every recall.
    gt = {"images": [{"id": 1, "width": 500, "height": 500}], "categories": [{"id": 1, "name": "car"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400}]}
    preds = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.5},
             {"image_id": 1, "category_id": 1, "bbox": [32.02, 300.0, 32.0, 32.0], "score": 0.9}]
    r = evaluate_coco(gt, preds)
    assert r.per_size["small"]["map50_95"] == pytest.approx(0.5) and r.map50_95 == pytest.approx(0.5)


def test_confusion_ignores_detections_on_a_crowd_region_of_their_class() -> None:
    # A car crowd region [0, 200]^2 and a car. Cars at 0.9 on the crowd (all inside: ignored, as
    # COCO does), 0.8 on the car (hit), 0.6 a quarter on the crowd (intersection over its area
    # 0.25 < 0.5: false); a bus at 0.7 on the crowd: no car, so a false bus.
    gt = {"images": [{"id": 1, "width": 500, "height": 500}],
          "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 200, 200], "iscrowd": 1},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [300, 300, 50, 50]}]}
    preds = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.9},
             {"image_id": 1, "category_id": 1, "bbox": [300, 300, 50, 50], "score": 0.8},
             {"image_id": 1, "category_id": 2, "bbox": [100, 100, 50, 50], "score": 0.7},
             {"image_id": 1, "category_id": 1, "bbox": [150, 150, 100, 100], "score": 0.6}]
    r = evaluate_coco(gt, preds)
    assert r.per_class["car"]["precision"] == pytest.approx(0.5) and r.recall == 1.0
    assert r.confusion == [[1, 0, 0], [0, 0, 0], [1, 1, 0]]


def test_ap_helpers() -> None:
    p, r, _ = precision_recall(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]), 2)
    assert p.tolist() == pytest.approx([1.0, 0.5, 2 / 3]) and r.tolist() == pytest.approx([0.5, 0.5, 1.0])
    ap, q = interpolated_ap(p, r)
    assert q[0] == 1.0 and q[50] == 1.0 and q[51] == pytest.approx(2 / 3)
    assert interpolated_ap(np.zeros(0), np.zeros(0))[0] == 0.0


def test_report_dict_has_the_keys_the_build_stage_reads() -> None:
    gt, res = make_case(3, n_img=5)
    d = evaluate_coco(gt, res).to_dict()
    for k in ("map50_95", "map50", "precision", "recall", "f1", "per_class", "per_size", "confusion", "pr_curves",
              "f1_curve"):
        assert k in d
    json.dumps(d)
