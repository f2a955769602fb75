"""NMS against a slow, obviously-correct reference on random boxes."""

from __future__ import annotations

import numpy as np
import pytest

from perception.boxes import box_iou
from perception.nms import batched_nms, nms


def reference_nms(boxes: np.ndarray, scores: np.ndarray, iou_thr: float) -> list[int]:
    """Textbook greedy NMS: one box at a time, plain Python loops."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep: list[int] = []
    for i in order:
        ok = True
        for k in keep:
            x1, y1 = max(boxes[i][0], boxes[k][0]), max(boxes[i][1], boxes[k][1])
            x2, y2 = min(boxes[i][2], boxes[k][2]), min(boxes[i][3], boxes[k][3])
            inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
            a = (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1])
            b = (boxes[k][2] - boxes[k][0]) * (boxes[k][3] - boxes[k][1])
            union = a + b - inter
            if union > 0 and inter / union > iou_thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def random_boxes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    # clustered boxes so that suppression actually happens
    centres = rng.uniform(0, 200, (max(1, n // 8), 2))
    c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 6, (n, 2))
    wh = rng.uniform(5, 60, (n, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)
    return boxes, rng.uniform(0, 1, n).astype(np.float32)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("iou_thr", [0.3, 0.5, 0.7])
def test_nms_matches_reference(seed: int, iou_thr: float) -> None:
    rng = np.random.default_rng(seed)
    boxes, scores = random_boxes(rng, int(rng.integers(1, 300)))
    assert nms(boxes, scores, iou_thr).tolist() == reference_nms(boxes, scores, iou_thr)


@pytest.mark.parametrize("seed", range(10))
def test_batched_nms_is_per_class(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    boxes, scores = random_boxes(rng, 200)
    classes = rng.integers(0, 4, 200)
    kept = set(batched_nms(boxes, scores, classes, 0.5).tolist())
    expected: set[int] = set()
    for c in range(4):
        idx = np.flatnonzero(classes == c)
        expected |= {int(idx[i]) for i in reference_nms(boxes[idx], scores[idx], 0.5)}
    assert kept == expected
    agnostic = batched_nms(boxes, scores, classes, 0.5, class_agnostic=True).tolist()
    assert agnostic == reference_nms(boxes, scores, 0.5)


def test_kept_boxes_do_not_overlap_beyond_threshold() -> None:
    boxes, scores = random_boxes(np.random.default_rng(7), 500)
    keep = nms(boxes, scores, 0.45)
    iou = box_iou(boxes[keep], boxes[keep])
    np.fill_diagonal(iou, 0)
    assert iou.max() <= 0.45 + 1e-6
    assert (np.diff(scores[keep]) <= 0).all()


def test_empty_input() -> None:
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)
    assert batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), 0.5).shape == (0,)


def test_the_fast_path_keeps_exactly_what_the_reference_keeps() -> None:
    """OpenCV's NMS (used for positive-area boxes) against the numpy reference: same kept boxes,
    same order, on 600 random clustered sets with ties, both class-aware and agnostic."""
    from perception.nms import batched_nms, reference_batched_nms

    rng = np.random.default_rng(7)
    for t in range(600):
        n = int(rng.integers(0, 300))
        centers = rng.uniform(0, 300, (max(1, n // 10), 2))
        c = centers[rng.integers(0, len(centers), n)] + rng.normal(0, 8, (n, 2))
        wh = rng.uniform(0.5, 60, (n, 2))
        b = np.concatenate([c, c + wh], 1).astype(np.float32)
        s = rng.random(n).astype(np.float32)
        if t % 3 == 0:
            s = np.round(s, 1)  # ties
        cls = rng.integers(0, 4, n)
        iou = float(rng.uniform(0.3, 0.8))
        for agnostic in (False, True):
            np.testing.assert_array_equal(batched_nms(b, s, cls, iou, agnostic),
                                          reference_batched_nms(b, s, cls, iou, agnostic), err_msg=f"case {t}")


def test_the_fast_path_keeps_boxes_of_other_classes_past_the_top_left_corner() -> None:
    """OpenCV shifts classes apart by the largest coordinate and assumes no negative one: a
    class-1 box past the top-left corner landed in class 0's region and was suppressed by a
    class-0 box there (IoU 0.45 after the shift)."""
    from perception.nms import reference_batched_nms

    boxes = np.array([[610, 610, 640, 640], [-30, -30, 5, 5]], np.float32)
    scores, classes = np.array([0.9, 0.8], np.float32), np.array([0, 1])
    assert sorted(reference_batched_nms(boxes, scores, classes, 0.3).tolist()) == [0, 1]
    assert sorted(batched_nms(boxes, scores, classes, 0.3).tolist()) == [0, 1]


def test_zero_area_path_decides_each_class_as_nms_of_that_class_alone() -> None:
    """Two class-79 boxes 3.3335 apart: IoU 66.665 / 133.335 = 0.49998, under 0.5, so both stay.
    The zero-area box sends batched_nms down the numpy path, which shifted class 79 by 79 * 640
    in float32, where the step is 1/256: 3.3335 became 3.33203, IoU 0.50015, and box 1 went."""
    from perception.nms import reference_batched_nms

    boxes = np.array([[0, 0, 10, 10], [3.3335, 0, 13.3335, 10], [5, 5, 5, 9], [0, 0, 639, 10]], np.float32)
    scores, classes = np.array([0.9, 0.8, 0.5, 0.1], np.float32), np.array([79, 79, 3, 0])
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == [0, 1, 2, 3]
    assert reference_batched_nms(boxes, scores, classes, 0.5).tolist() == [0, 1, 2, 3]
