"""The vectorised post-processing against a slow, obviously-correct reference."""

from __future__ import annotations

import numpy as np
import pytest

from perception.errors import InvalidInputError
from perception.layouts import decoder_for
from perception.letterbox import compute_letterbox
from perception.manifest import PostprocessSpec
from perception.postprocess import PostprocessOptions, merge_options
from perception.postprocess import postprocess as _postprocess


def postprocess(out, lb, opts):
    """Today's layout, one image: (N, 5 + C) -> detections in source pixels."""
    return _postprocess({"predictions": out}, lb, opts, decoder_for("yolo_obj"), out.shape[1] - 5)


def reference(out, lb, opts: PostprocessOptions):
    """Anchor by anchor, class by class, in plain Python."""
    cands: list[tuple[float, int, list[float]]] = []
    for row in out.tolist():
        obj = row[4]
        best_c, best_s = None, -1.0
        for c, p in enumerate(row[5:]):
            if opts.class_filter and c not in opts.class_filter:
                continue
            if obj * p > best_s:
                best_c, best_s = c, obj * p
        if best_c is not None and best_s >= opts.score_threshold:
            cands.append((best_s, best_c, row[:4]))
    cands.sort(key=lambda t: -t[0])
    cands = cands[: opts.pre_nms_topk]
    kept: list[tuple[float, int, list[float]]] = []
    for s, c, b in cands:
        suppressed = False
        for _, c2, b2 in kept:
            if not opts.class_agnostic and c2 != c:
                continue
            iw = max(0.0, min(b[2], b2[2]) - max(b[0], b2[0]))
            ih = max(0.0, min(b[3], b2[3]) - max(b[1], b2[1]))
            inter = iw * ih
            union = (b[2] - b[0]) * (b[3] - b[1]) + (b2[2] - b2[0]) * (b2[3] - b2[1]) - inter
            if union > 0 and inter / union > opts.iou_threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append((s, c, b))
    res = []
    for s, c, b in kept:
        x1 = min(max((b[0] - lb.pad_left) / lb.scale_x, 0), lb.src_w)
        y1 = min(max((b[1] - lb.pad_top) / lb.scale_y, 0), lb.src_h)
        x2 = min(max((b[2] - lb.pad_left) / lb.scale_x, 0), lb.src_w)
        y2 = min(max((b[3] - lb.pad_top) / lb.scale_y, 0), lb.src_h)
        if x2 > x1 and y2 > y1:  # a box wholly in the padding is none
            res.append((s, c, (x1, y1, x2, y2)))
    return res[: opts.max_detections]


def head(rng, n=400, c=7, w=96, h=64):
    """Random (N, 5 + C) output: clustered boxes, distinct scores."""
    centres = rng.uniform(0, [w, h], (max(1, n // 10), 2))
    xy = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 3, (n, 2))
    wh = rng.uniform(4, 30, (n, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    obj = rng.uniform(0, 1, (n, 1))
    cls = rng.uniform(0, 1, (n, c))
    return np.concatenate([boxes, obj, cls], axis=1).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("agnostic", [False, True])
def test_matches_reference(seed, agnostic):
    rng = np.random.default_rng(seed)
    out = head(rng)
    lb = compute_letterbox(int(rng.integers(50, 400)), int(rng.integers(50, 400)), 96, 64)
    filt = () if seed % 2 else (1, 3, 4)
    opts = PostprocessOptions(score_threshold=float(rng.uniform(0.05, 0.4)), iou_threshold=float(rng.uniform(0.3, 0.7)),
                              max_detections=int(rng.integers(5, 60)), pre_nms_topk=int(rng.integers(20, 300)),
                              class_agnostic=agnostic, class_filter=filt)
    det = postprocess(out, lb, opts)
    ref = reference(out, lb, opts)
    assert len(det) == len(ref) > 0
    for i, (s, c, b) in enumerate(ref):
        assert det.class_ids[i] == c
        assert det.scores[i] == pytest.approx(s, rel=1e-5)
        np.testing.assert_allclose(det.boxes[i], b, rtol=1e-4, atol=1e-3)
    if filt:
        assert set(det.class_ids.tolist()) <= set(filt)
    assert (det.boxes[:, [0, 2]] <= lb.src_w).all() and (det.boxes >= 0).all()


def test_empty_cases():
    lb = compute_letterbox(100, 100, 96, 64)
    opts = PostprocessOptions(0.5, 0.5, 10, 100)
    assert len(postprocess(np.zeros((0, 12), np.float32), lb, opts)) == 0
    low = head(np.random.default_rng(0))
    low[:, 4] = 0.01
    assert len(postprocess(low, lb, opts)) == 0


def test_merge_options_rejects_absurd_values():
    spec = PostprocessSpec(score_threshold=0.3, iou_threshold=0.5, max_detections=50)
    o = merge_options(spec, 7)
    assert (o.score_threshold, o.iou_threshold, o.max_detections) == (0.3, 0.5, 50)
    o = merge_options(spec, 7, score_threshold=0.6, class_filter=(3, 1, 3), class_agnostic=True)
    assert o.score_threshold == 0.6 and o.class_filter == (1, 3) and o.class_agnostic
    for kw in ({"score_threshold": -0.1}, {"iou_threshold": 1.5}, {"max_detections": 10**9},
               {"class_filter": (7,)}, {"score_threshold": float("inf")}):
        with pytest.raises(InvalidInputError):
            merge_options(spec, 7, **kw)


def test_a_post_nms_models_class_ids_out_of_range_are_dropped_and_told_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A torchvision export (ids from 1, background 0) served without class_offset 1: its last
    class's rows are dropped, which used to happen in silence. The first is logged, with the
    fix; padding rows (score 0) are not counted."""
    import logging

    from perception.layouts import nms_detections as nd
    from perception.options import PostprocessOptions

    monkeypatch.setattr(nd, "_told_out_of_range", False)
    caplog.set_level(logging.WARNING, logger=nd.__name__)
    opts = PostprocessOptions(score_threshold=0.3, iou_threshold=0.5, max_detections=100, pre_nms_topk=1000)
    outputs = {"boxes": np.array([[0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 1, 1]], np.float32),
               "scores": np.array([0.9, 0.8, 0.0], np.float32),
               "classes": np.array([1, 3, -1], np.float32)}  # 3 classes: id 3 is out of range
    for _ in range(2):
        det = nd.NmsDetections().candidates(outputs, opts, num_classes=3)
        assert det.class_ids.tolist() == [1]
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 1 and "class id 3" in told[0] and "--class-offset 1" in told[0]
    caplog.clear()
    padded = {**outputs, "classes": np.array([1, 2, -1], np.float32)}  # only the padding row is out
    nd.NmsDetections().candidates(padded, opts, num_classes=3)
    monkeypatch.setattr(nd, "_told_out_of_range", False)
    nd.NmsDetections().candidates(padded, opts, num_classes=3)
    assert not caplog.records


@pytest.mark.parametrize("bad", [[np.nan, 0, 5, 5], [np.inf, 0, np.inf, 5], [0, -np.inf, 5, 5]])
@pytest.mark.parametrize("agnostic", [False, True])
def test_a_non_finite_box_is_dropped_and_the_rest_of_the_frame_still_goes_through_nms(bad, agnostic):
    """One NaN box used to make every class-shifted box NaN in NMS (nothing suppressed, and the
    NaN box sent on to clients); an inf one made the class shift inf, with the same effect. The
    bad row is dropped and the others come out as they do without it."""
    lb = compute_letterbox(100, 100, 100, 100)
    opts = PostprocessOptions(score_threshold=0.25, iou_threshold=0.5, max_detections=100, pre_nms_topk=1000,
                              class_agnostic=agnostic)
    clean = np.array([[10, 10, 50, 50, 1, 0.9, 0],
                      [11, 11, 51, 51, 1, 0.8, 0],  # overlaps the first, same class: suppressed
                      [60, 60, 90, 90, 1, 0, 0.7]], np.float32)
    want = postprocess(clean, lb, opts)
    assert want.scores.tolist() == pytest.approx([0.9, 0.7])
    for score in (0.95, 0.6):  # ranked above and below the others
        out = np.concatenate([clean, np.array([[*bad, 1, score, 0]], np.float32)])
        det = postprocess(out, lb, opts)
        assert np.isfinite(det.boxes).all()
        np.testing.assert_array_equal(det.boxes, want.boxes)
        np.testing.assert_array_equal(det.class_ids, want.class_ids)
        np.testing.assert_allclose(det.scores, want.scores)


def test_an_inf_score_is_dropped() -> None:
    lb = compute_letterbox(100, 100, 100, 100)
    opts = PostprocessOptions(0.25, 0.5, 100, 1000)
    out = np.array([[10, 10, 50, 50, 1, 0.9, 0], [60, 60, 90, 90, np.inf, 1, 0]], np.float32)
    det = postprocess(out, lb, opts)
    assert det.scores.tolist() == pytest.approx([0.9]) and np.isfinite(det.scores).all()


def test_a_box_wholly_in_the_padding_is_no_detection_and_takes_no_place() -> None:
    """A 1920x1080 frame in a 640x640 input has 140 px of padding above it: a box there clipped
    to zero height and came out first, with its score, and pushed a real one past
    max_detections."""
    lb = compute_letterbox(1920, 1080, 640, 640)
    assert lb.pad_top == 140
    opts = PostprocessOptions(score_threshold=0.25, iou_threshold=0.5, max_detections=1, pre_nms_topk=1000)
    out = np.array([[100, 10, 200, 120, 1, 0.9, 0],  # wholly above the image
                    [300, 300, 360, 380, 1, 0.8, 0]], np.float32)
    det = postprocess(out, lb, opts)
    assert det.scores.tolist() == pytest.approx([0.8]) and (det.boxes[:, 2:] > det.boxes[:, :2]).all()
