"""Model-assisted label QA, in the spirit of cleanlab's object-detection label issues: a
trained detector's confident opinion is compared with each image's labels.

- ``bad_box``: a label whose class the model confidently sees at a clearly different extent
  (the best IoU of a confident same-class detection in [0.2, 0.5)); score = detection score x
  (1 - IoU). A label 25 % off (IoU 0.5-0.7) is not flagged: the shipped model's own boxes on
  8-25 px objects are that far off, and a band up to 0.7 tripled the bad_box flags on 48
  generated images at a precision of 0.29 (0.86 with 0.5).
- ``missing_label``: a confident detection overlapping no label (IoU < 0.3): an object nobody
  labelled; score = detection score.
- ``wrong_class``: a label the model confidently sees as another class (IoU >= 0.5) while it
  barely supports the labelled class there; score = other score - same-class score.
- ``no_object``: a label with no detection of any class, even at a low score, overlapping it;
  score = 1 - best overlapping score.

Detections come from the one frame pipeline, as served (``build_engine.evaluate.predict``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from build_engine.data.formats import LabelledSet, Sample
from build_engine.evaluate import predict
from build_engine.label_qa.issues import Issue
from build_engine.label_qa.records import LabelSet, boxes_of
from perception.boxes import box_iou
from perception.manifest import PostprocessSpec, PreprocessSpec
from perception.pipeline import FramePipeline, InferFn, RequestOptions

# Thresholds chosen on the injected-mistake measurement (build_engine.label_qa.measure).
CONFIDENT = 0.5  # a detection the model stands by
SUPPORT = 0.05  # any support at all for an object
MISSING_IOU = 0.3
BAD_BOX_IOU = (0.2, 0.5)  # up to 0.7 flagged mostly right labels of small objects (module docstring)
SAME_OBJECT_IOU = 0.5
# A detection this much inside a crowd region is one of its objects (COCO matches by this share).
CROWD_INSIDE = 0.5
# Labels smaller than this are not judged by the model (it cannot see them reliably).
MIN_JUDGED_PX = 8.0


def detections_by_image(
    runner: InferFn, ls: LabelSet, input_size: tuple[int, int], output_layout: str = "yolo_obj"
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """image_id -> (boxes (N, 4) xyxy source px, scores (N,), class ids (N,)) at a low threshold.
    ``output_layout``: how the runner's outputs read (the model family's: ``postprocess_for``)."""
    samples = [Sample(iid, ls.root / f, w, h, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
               for iid, (f, w, h) in ls.images.items()]
    ds = LabelledSet(ls.root, ls.classes, samples)
    pre = PreprocessSpec(input_width=input_size[0], input_height=input_size[1])
    post = PostprocessSpec(output_layout=output_layout, score_threshold=SUPPORT, iou_threshold=0.5,
                           max_detections=300, pre_nms_topk=2000)
    preds = predict(runner, ds, FramePipeline(pre, post, ls.classes), RequestOptions())
    rows: dict[int, list[tuple[list[float], float, int]]] = {iid: [] for iid in ls.images}
    for p in preds:
        x, y, w, h = p["bbox"]
        rows[p["image_id"]].append(([x, y, x + w, y + h], p["score"], p["category_id"] - 1))
    return {
        k: (np.array([r[0] for r in v], np.float32).reshape(-1, 4), np.array([r[1] for r in v], np.float32),
            np.array([r[2] for r in v], np.int64))
        for k, v in rows.items()
    }


def image_issues(
    ls: LabelSet, image_id: int, det: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> list[Issue]:
    """Model-assisted issues of one image."""
    gb, gc, recs = boxes_of(ls, image_id)
    db, ds, dc = det
    f = ls.images[image_id][0]
    out: list[Issue] = []
    iou = box_iou(gb, db) if len(gb) and len(db) else np.zeros((len(gb), len(db)), np.float32)
    # Crowd regions (COCO iscrowd) are judged by none of the checks below, as training and
    # evaluation ignore them: the objects in one are no missing labels (a region around four
    # cars had two of them flagged), and the region itself is no object of one box.
    crowd = np.array([r.crowd for r in recs], bool)
    for g, r in enumerate(recs):
        if r.crowd:
            continue
        w, h = gb[g, 2] - gb[g, 0], gb[g, 3] - gb[g, 1]
        if min(w, h) < MIN_JUDGED_PX:
            continue
        name = ls.classes[int(gc[g])]
        row = iou[g] if len(db) else np.zeros(0)
        same = dc == gc[g]
        overlapping = row >= MISSING_IOU
        best_any = float(ds[overlapping].max()) if overlapping.any() else 0.0
        if not (row >= 0.1).any() or float(ds[row >= 0.1].max()) < SUPPORT * 2:
            out.append(Issue(f, image_id, r.box, "no_object", 1.0 - best_any, name, r.ref,
                             "no detection overlaps this label"))
            continue
        same_obj = row >= SAME_OBJECT_IOU
        s_same = float(ds[same_obj & same].max()) if (same_obj & same).any() else 0.0
        other = same_obj & ~same
        if other.any():
            k = int(np.flatnonzero(other)[np.argmax(ds[other])])
            if ds[k] >= CONFIDENT and ds[k] - s_same > 0.3:
                out.append(Issue(f, image_id, r.box, "wrong_class", float(ds[k] - s_same), name, r.ref,
                                 f"model says {ls.classes[int(dc[k])]} ({ds[k]:.2f}), {name} {s_same:.2f}"))
                continue
        conf_same = same & (ds >= CONFIDENT)
        if conf_same.any():
            # The confident same-class detection that fits the label best.
            k = int(np.flatnonzero(conf_same)[np.argmax(row[conf_same])])
            if BAD_BOX_IOU[0] <= row[k] < BAD_BOX_IOU[1]:
                # The confident detection must not belong to another label that it fits better.
                col = iou[:, k]
                if int(np.argmax(col)) == g:
                    model_box = np.round(db[k]).astype(int).tolist()
                    out.append(Issue(f, image_id, r.box, "bad_box", float(ds[k] * (1 - row[k])), name, r.ref,
                                     f"model box {model_box} IoU {row[k]:.2f} ({ds[k]:.2f})"))
    for d in np.flatnonzero(ds >= CONFIDENT):
        if crowd.any() and float(_inside(db[d], gb[crowd]).max()) >= CROWD_INSIDE:
            continue  # in a crowd region
        if not (~crowd).any() or float(iou[~crowd, d].max()) < MISSING_IOU:
            x1, y1, x2, y2 = (float(v) for v in db[d])
            out.append(Issue(f, image_id, (x1, y1, x2, y2), "missing_label", float(ds[d]), ls.classes[int(dc[d])], "",
                             "confident detection with no label"))
    return out


def _inside(box: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """The share of ``box``'s area inside each of ``regions`` (xyxy), as COCO matches a
    detection to a crowd region (intersection over the detection's area)."""
    x1 = np.maximum(box[0], regions[:, 0])
    y1 = np.maximum(box[1], regions[:, 1])
    x2 = np.minimum(box[2], regions[:, 2])
    y2 = np.minimum(box[3], regions[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = max(float((box[2] - box[0]) * (box[3] - box[1])), 1e-9)
    return np.asarray(inter / area, np.float64)


def find_model_issues(
    ls: LabelSet, runner: InferFn, input_size: tuple[int, int], output_layout: str = "yolo_obj"
) -> list[Issue]:
    """All model-assisted issues of a dataset (unranked); ``output_layout``: the model family's."""
    dets = detections_by_image(runner, ls, input_size, output_layout)
    out: list[Issue] = []
    for iid in ls.images:
        out += image_issues(ls, iid, dets[iid])
    return out


def summary(issues: list[Issue]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for i in issues:
        counts[i.kind] = counts.get(i.kind, 0) + 1
    return {"issues": len(issues), "by_kind": counts}
