"""Greedy non-maximum suppression, vectorised over the candidate set.

Measured (docs/performance.md): numpy NMS over thousands of candidates costs as much as a
small model, so callers cut candidates by score and a pre-NMS top-k first, and ``batched_nms``
runs OpenCV's C++ NMS where it keeps the same boxes.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from perception.boxes import box_area


def nms(
    boxes: NDArray[np.floating], scores: NDArray[np.floating], iou_threshold: float
) -> NDArray[np.int64]:
    """Indices of the boxes kept by greedy NMS, highest score first.

    boxes: (N, 4) xyxy; scores: (N,). A box is suppressed when its IoU with a kept,
    higher-scoring box is strictly greater than ``iou_threshold``. Ties in score keep the
    lower index first (stable sort).
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    if b.shape[0] == 0:
        return np.zeros((0,), np.int64)
    order = np.argsort(-s, kind="stable")
    areas = box_area(b)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        if rest.size == 0:
            break
        xx1 = np.maximum(b[i, 0], b[rest, 0])
        yy1 = np.maximum(b[i, 1], b[rest, 1])
        xx2 = np.minimum(b[i, 2], b[rest, 2])
        yy2 = np.minimum(b[i, 3], b[rest, 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: NDArray[np.floating],
    scores: NDArray[np.floating],
    class_ids: NDArray[np.integer],
    iou_threshold: float,
    class_agnostic: bool = False,
) -> NDArray[np.int64]:
    """NMS per class (boxes of different classes never suppress each other) unless agnostic.

    Returns kept indices, highest score first. OpenCV's C++ NMS (4-6x faster than the numpy
    loop: docs/performance.md) runs when every box has a positive area, where it keeps exactly
    the boxes ``nms`` keeps (tested against it); zero-area boxes, where the two differ, take the
    numpy path, ``nms`` class by class. Boxes and scores must be finite (``perception.postprocess``
    drops the others first): OpenCV shifts each class to its own region of the plane by the
    largest coordinate, which one inf box makes inf.
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if b.shape[0] == 0:
        return np.zeros((0,), np.int64)
    wh = b[:, 2:] - b[:, :2]
    if bool(np.all(wh > 0)):
        xywh = np.concatenate([b[:, :2], wh], axis=1).astype(np.float64)
        # OpenCV shifts each class by (largest coordinate + 1) and assumes none is negative: a
        # box past the top-left corner landed in the previous class's region and suppressed
        # across classes. Moving every box by the same amount changes no IoU.
        low = float(xywh[:, :2].min())
        if low < 0:
            xywh[:, :2] -= low
        s = np.asarray(scores, np.float32).reshape(-1)
        # One class for agnostic NMS (NMSBoxes itself refuses the -1 score floor that keeps every
        # candidate, including a score of exactly 0).
        ids = np.zeros(len(b), np.int32) if class_agnostic else np.asarray(class_ids).astype(np.int32).reshape(-1)
        # Python lists: what OpenCV's bindings declare, and faster to convert than arrays (measured).
        kept = cv2.dnn.NMSBoxesBatched(xywh.tolist(), s.tolist(), ids.tolist(), -1.0, float(iou_threshold))
        return np.asarray(kept, np.int64).reshape(-1)
    return reference_batched_nms(b, scores, class_ids, iou_threshold, class_agnostic)


def reference_batched_nms(
    boxes: NDArray[np.floating],
    scores: NDArray[np.floating],
    class_ids: NDArray[np.integer],
    iou_threshold: float,
    class_agnostic: bool = False,
) -> NDArray[np.int64]:
    """``batched_nms`` in plain numpy: the reference the fast path is tested against.

    ``nms`` of each class alone, not one pass over boxes shifted to a region per class: a float32
    shift of class_id * span rounds away the low bits of every coordinate and so moves IoUs near
    the threshold across it (80 classes at 640 px: 3 of 3000 random pairs decided otherwise).
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if b.shape[0] == 0:
        return np.zeros((0,), np.int64)
    if class_agnostic:
        return nms(b, scores, iou_threshold)
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    cls = np.asarray(class_ids).reshape(-1)
    keep = np.sort(np.concatenate([idx[nms(b[idx], s[idx], iou_threshold)]
                                   for idx in (np.flatnonzero(cls == c) for c in np.unique(cls))]))
    # Highest score first, ties lower index first: the order ``nms`` gives over all the boxes.
    return keep[np.argsort(-s[keep], kind="stable")]
