"""Detection KPI maths in pure numpy: matching, precision / recall, PR curve, AP, COCO
mAP50-95 / mAP50 (the exact COCO protocol: 101-point interpolation, max 100 detections per
image and class, crowd and area-range ignores), per class, per object size, confusion matrix,
and P / R / F1 at the deployed score threshold.

Boxes are xyxy pixels here; COCO files carry xywh and are converted on entry, in float64 and
with the w * h areas beside them, as pycocotools computes (``perception.coco.bbox_corners``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from perception.coco import CocoDataset, bbox_corners, parse_coco, parse_results

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
AREA_RANGES = {"all": (0.0, 1e10), "small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e10)}
MAX_DETS = 100

# (image id, category id) -> the predictions' (xyxy boxes, scores, w * h areas), all float64
Grouped = dict[tuple[int, int], tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]]


def iou_matrix(
    dt: NDArray[np.floating], gt: NDArray[np.floating], crowd: NDArray[np.bool_] | None = None,
    dt_area: NDArray[np.floating] | None = None, gt_area: NDArray[np.floating] | None = None,
) -> NDArray[np.float64]:
    """(D, G) IoU of xyxy boxes; for a crowd ground truth, intersection over the detection's area (COCO).

    dt_area, gt_area: the boxes' areas, if known, else computed from the corners. COCO boxes
    give w * h, which pycocotools uses and ((x + w) - x) * ((y + h) - y) can miss in the last
    bit: enough to move an IoU that sits exactly on a threshold across it.
    """
    dt = np.asarray(dt, np.float64).reshape(-1, 4)
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    lt = np.maximum(dt[:, None, :2], gt[None, :, :2])
    rb = np.minimum(dt[:, None, 2:], gt[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    a_dt = np.clip(dt[:, 2:] - dt[:, :2], 0, None).prod(-1) if dt_area is None else np.asarray(dt_area, np.float64)
    a_gt = np.clip(gt[:, 2:] - gt[:, :2], 0, None).prod(-1) if gt_area is None else np.asarray(gt_area, np.float64)
    union = a_dt[:, None] + a_gt[None, :] - inter
    if crowd is not None and crowd.any():
        union = np.where(crowd[None, :], a_dt[:, None], union)
    return np.where(union > 0, inter / np.maximum(union, 1e-300), 0.0)


def match_image(
    dt_boxes: NDArray[np.floating], dt_scores: NDArray[np.floating], dt_area: NDArray[np.floating],
    gt_boxes: NDArray[np.floating], gt_box_area: NDArray[np.floating], gt_area: NDArray[np.floating],
    gt_crowd: NDArray[np.bool_], area_range: tuple[float, float],
    iou_thresholds: NDArray[np.floating] = IOU_THRESHOLDS, max_dets: int = MAX_DETS,
) -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.bool_], NDArray[np.bool_]]:
    """Greedy COCO matching of one image and class.

    dt_area: the detections' w * h, for the IoU and the area range alike (pycocotools);
    gt_box_area: the ground truth's w * h, for the IoU; gt_area: its annotated area, for the
    area range. Returns (scores (D,), matched (T, D), dt_ignored (T, D), gt_ignored (G,)),
    detections sorted by descending score and cut to ``max_dets``.
    """
    gt_ig = gt_crowd | (gt_area < area_range[0]) | (gt_area > area_range[1])
    g_order = np.argsort(gt_ig, kind="mergesort")
    gt_b, gt_b_area, gt_ig_s, crowd_s = gt_boxes[g_order], gt_box_area[g_order], gt_ig[g_order], gt_crowd[g_order]
    d_order = np.argsort(-dt_scores, kind="mergesort")[:max_dets]
    dt_b, scores, d_area = dt_boxes[d_order], dt_scores[d_order], dt_area[d_order]
    T, D, G = len(iou_thresholds), len(d_order), len(g_order)
    matched = np.zeros((T, D), bool)
    dt_ig = np.zeros((T, D), bool)
    if D and G:
        ious = iou_matrix(dt_b, gt_b, crowd_s, d_area, gt_b_area)
        for ti, t in enumerate(iou_thresholds):
            gtm = np.zeros(G, bool)
            for di in range(D):
                best = min(t, 1 - 1e-10)
                m = -1
                for gi in range(G):
                    if gtm[gi] and not crowd_s[gi]:
                        continue
                    if m > -1 and not gt_ig_s[m] and gt_ig_s[gi]:
                        break
                    if ious[di, gi] < best:
                        continue
                    best, m = ious[di, gi], gi
                if m == -1:
                    continue
                dt_ig[ti, di] = gt_ig_s[m]
                matched[ti, di] = True
                gtm[m] = True
    out_of_range = (d_area < area_range[0]) | (d_area > area_range[1])
    dt_ig |= ~matched & out_of_range[None, :]
    return scores.astype(np.float64), matched, dt_ig, gt_ig


def precision_recall(
    scores: NDArray[np.floating], tp: NDArray[np.bool_], num_gt: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.floating]]:
    """Cumulative (precision, recall, sorted scores) over detections sorted by score (stable).
    The sorted scores keep the dtype of ``scores``."""
    order = np.argsort(-scores, kind="mergesort")
    tp_s = tp[order].astype(np.float64)
    tps = np.cumsum(tp_s)
    fps = np.cumsum(1.0 - tp_s)
    recall = tps / max(num_gt, 1)
    precision = tps / np.maximum(tps + fps, np.spacing(1))
    return precision, recall, scores[order]


def interpolated_ap(precision: NDArray[np.floating], recall: NDArray[np.floating]) -> tuple[float, NDArray[np.float64]]:
    """COCO 101-point AP and the interpolated precision at each recall threshold."""
    pr = np.maximum.accumulate(np.asarray(precision, np.float64)[::-1])[::-1] if len(precision) else np.zeros(0)
    q = np.zeros(len(RECALL_THRESHOLDS))
    idx = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
    ok = idx < len(pr)
    q[ok] = pr[idx[ok]]
    return float(q.mean()), q


@dataclass
class KpiReport:
    """All KPIs of one evaluation. ``to_dict()`` is the JSON the CLI prints."""

    map50_95: float
    map50: float
    map75: float
    precision: float
    recall: float
    f1: float
    score_threshold: float
    per_class: dict[str, dict[str, float]]
    per_size: dict[str, dict[str, float]]
    confusion: list[list[int]]  # (C + 1) x (C + 1): rows ground truth, columns prediction; last = background
    classes: list[str]
    pr_curves: dict[str, list[float]]  # class -> precision at RECALL_THRESHOLDS (IoU 0.5)
    f1_curve: dict[str, list[float]]  # thresholds, precision, recall, f1 (all classes, IoU 0.5)
    best_f1_threshold: float
    num_images: int
    num_gt: int
    num_dets: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, curves: bool = True) -> dict[str, Any]:
        d = {
            "map50_95": self.map50_95, "map50": self.map50, "map75": self.map75,
            "precision": self.precision, "recall": self.recall, "f1": self.f1,
            "score_threshold": self.score_threshold, "best_f1_threshold": self.best_f1_threshold,
            "num_images": self.num_images, "num_gt": self.num_gt, "num_dets": self.num_dets,
            "per_class": self.per_class, "per_size": self.per_size,
            "classes": self.classes, "confusion": self.confusion,
        }
        if curves:
            d["pr_curves"] = {"recall": RECALL_THRESHOLDS.tolist(), **self.pr_curves}
            d["f1_curve"] = self.f1_curve
        d.update(self.extra)
        return d


def _group_predictions(predictions: list[dict[str, Any]]) -> Grouped:
    rows: dict[tuple[int, int], list[tuple[list[float], float]]] = {}
    for p in predictions:
        rows.setdefault((int(p["image_id"]), int(p["category_id"])), []).append((p["bbox"], float(p["score"])))
    grouped: Grouped = {}
    for k, v in rows.items():
        boxes, areas = bbox_corners(np.array([r[0] for r in v], np.float64))
        grouped[k] = boxes, np.array([r[1] for r in v], np.float64), areas
    return grouped


def evaluate_coco(
    gt: dict[str, Any] | CocoDataset, predictions: list[dict[str, Any]], score_threshold: float = 0.25
) -> KpiReport:
    """Score COCO results against COCO ground truth.

    mAP50-95 / mAP50 / per-size follow pycocotools exactly; precision, recall and F1 are at
    ``score_threshold`` (IoU 0.5, all sizes, micro-averaged over classes, counting the
    detections of classes the ground truth has no box of as false positives).
    """
    g = gt if isinstance(gt, CocoDataset) else parse_coco(gt, "<gt>")
    preds = parse_results(predictions, g, "<predictions>")
    grouped = _group_predictions(preds)
    cat_ids = sorted(g.categories)
    names = [g.categories[c] for c in cat_ids]
    img_ids = sorted(g.images)
    T = len(IOU_THRESHOLDS)
    ap = {a: np.full((T, len(cat_ids)), -1.0) for a in AREA_RANGES}
    pr_curves: dict[str, list[float]] = {}
    all_scores, all_tp = [], []
    total_gt = 0
    per_class: dict[str, dict[str, float]] = {}
    nothing = (np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    for ci, cid in enumerate(cat_ids):
        for area_name, rng in AREA_RANGES.items():
            sc, mt, ig, n_gt = [], [], [], 0
            for iid in img_ids:
                mask = g.labels[iid] == cid
                gb, gb_area = bbox_corners(g.xywh[iid][mask])
                db, ds, d_area = grouped.get((iid, cid), nothing)
                if len(gb) == 0 and len(db) == 0:
                    continue
                s, m, di, gi = match_image(db, ds, d_area, gb, gb_area, g.areas[iid][mask], g.iscrowd[iid][mask], rng)
                sc.append(s)
                mt.append(m)
                ig.append(di)
                n_gt += int((~gi).sum())
            scores = np.concatenate(sc) if sc else np.zeros(0)
            matched = np.concatenate(mt, axis=1) if mt else np.zeros((T, 0), bool)
            ignored = np.concatenate(ig, axis=1) if ig else np.zeros((T, 0), bool)
            if n_gt == 0:
                # No AP for a class the ground truth lacks (pycocotools), but its detections are
                # false positives all the same: left out, 10 spurious buses beside one right car
                # scored precision 1.0.
                if area_name == "all":
                    all_scores.append(scores[~ignored[0]])
                    all_tp.append(np.zeros(int((~ignored[0]).sum()), bool))
                continue
            for ti in range(T):
                keep = ~ignored[ti]
                p, r, _ = precision_recall(scores[keep], matched[ti][keep], n_gt)
                ap_t, q = interpolated_ap(p, r)
                ap[area_name][ti, ci] = ap_t
                if area_name == "all" and ti == 0:
                    pr_curves[names[ci]] = q.tolist()
                    all_scores.append(scores[keep])
                    all_tp.append(matched[0][keep])
                    total_gt += n_gt
                    thr_keep = scores[keep] >= score_threshold
                    tp_c = int(matched[0][keep][thr_keep].sum())
                    n_det = int(thr_keep.sum())
                    per_class[names[ci]] = {
                        "ap50": ap_t,
                        "precision": tp_c / n_det if n_det else 0.0,
                        "recall": tp_c / n_gt,
                        "num_gt": n_gt,
                    }
        if names[ci] in per_class:
            per_class[names[ci]]["ap50_95"] = float(ap["all"][:, ci].mean())
            per_class[names[ci]]["ap75"] = float(ap["all"][5, ci])

    def mean_valid(a: np.ndarray) -> float:
        v = a[a > -1]
        return float(v.mean()) if v.size else -1.0

    sc_all = np.concatenate(all_scores) if all_scores else np.zeros(0)
    tp_all = np.concatenate(all_tp) if all_tp else np.zeros(0, bool)
    thresholds = np.linspace(0, 1, 101)
    n_det_t = np.array([(sc_all >= t).sum() for t in thresholds], np.float64)
    tp_t = np.array([tp_all[sc_all >= t].sum() for t in thresholds], np.float64)
    prec_t = np.where(n_det_t > 0, tp_t / np.maximum(n_det_t, 1), 0.0)
    rec_t = tp_t / max(total_gt, 1)
    f1_t = np.where(prec_t + rec_t > 0, 2 * prec_t * rec_t / np.maximum(prec_t + rec_t, 1e-12), 0.0)
    keep = sc_all >= score_threshold
    n_det = int(keep.sum())
    tp = int(tp_all[keep].sum())
    precision = tp / n_det if n_det else 0.0
    recall = tp / total_gt if total_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    per_size = {
        a: {"map50_95": mean_valid(ap[a]), "map50": mean_valid(ap[a][0])} for a in ("small", "medium", "large")
    }
    return KpiReport(
        map50_95=mean_valid(ap["all"]), map50=mean_valid(ap["all"][0]), map75=mean_valid(ap["all"][5]),
        precision=precision, recall=recall, f1=f1, score_threshold=score_threshold,
        per_class=per_class, per_size=per_size,
        confusion=confusion_matrix(g, grouped, cat_ids, score_threshold).tolist(), classes=names,
        pr_curves=pr_curves,
        f1_curve={
            "threshold": thresholds.tolist(),
            "precision": prec_t.tolist(),
            "recall": rec_t.tolist(),
            "f1": f1_t.tolist(),
        },
        best_f1_threshold=float(thresholds[int(np.argmax(f1_t))]),
        num_images=len(img_ids), num_gt=g.num_annotations, num_dets=len(preds),
    )


def confusion_matrix(
    g: CocoDataset, grouped: Grouped, cat_ids: list[int], score_threshold: float, iou_threshold: float = 0.5,
) -> NDArray[np.int64]:
    """(C + 1, C + 1) counts: rows ground-truth class, columns predicted class; index C is
    background (a missed object: row c, column C; a false detection: row C, column c).
    Class-agnostic greedy matching by score at ``iou_threshold``. A detection left over on a
    crowd region of its own class (intersection over the detection's area at ``iou_threshold``)
    counts nowhere: COCO ignores it, so precision and recall do too."""
    C = len(cat_ids)
    index = {c: i for i, c in enumerate(cat_ids)}
    cm = np.zeros((C + 1, C + 1), np.int64)
    by_image: dict[int, list[tuple[np.ndarray, float, int, float]]] = {}
    for (iid, cid), (boxes, scores, areas) in grouped.items():
        for b, s, a in zip(boxes, scores, areas, strict=True):
            if s >= score_threshold:
                by_image.setdefault(iid, []).append((b, s, index[cid], a))
    for iid in g.images:
        crowd = g.iscrowd[iid]
        boxes, box_area = bbox_corners(g.xywh[iid])
        gb, ga, gl = boxes[~crowd], box_area[~crowd], g.labels[iid][~crowd]
        dets = sorted(by_image.get(iid, []), key=lambda r: -r[1])
        used = np.zeros(len(gb), bool)
        if dets:
            db, da = np.array([d[0] for d in dets]), np.array([d[3] for d in dets])
            ious = iou_matrix(db, gb, None, da, ga)
            # (D, crowd regions): the detection lies on the region and is of its class
            on_crowd = (iou_matrix(db, boxes[crowd], crowd[crowd], da, box_area[crowd]) >= iou_threshold) & (
                g.labels[iid][crowd][None, :] == np.array([cat_ids[d[2]] for d in dets])[:, None])
        for di, (_, _, pc, _) in enumerate(dets):
            if len(gb):
                cand = np.where(used, -1.0, ious[di])
                gi = int(np.argmax(cand))
                if cand[gi] >= iou_threshold:
                    used[gi] = True
                    cm[index[int(gl[gi])], pc] += 1
                    continue
            if not on_crowd[di].any():
                cm[C, pc] += 1
        for missed in np.flatnonzero(~used):
            cm[index[int(gl[missed])], C] += 1
    return cm
