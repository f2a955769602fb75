"""Greedy non-maximum suppression, vectorised over the candidate set.

Measured (docs/performance.md): numpy NMS over thousands of candidates costs as much as a
small model, so callers cut candidates by score and a pre-NMS top-k first.
"""

from __future__ import annotations

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

    Uses the coordinate-offset trick: each class is shifted to its own region of the plane,
    so one NMS pass handles every class. Returns kept indices, highest score first.
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if b.shape[0] == 0:
        return np.zeros((0,), np.int64)
    if class_agnostic:
        return nms(b, scores, iou_threshold)
    span = float(b.max() - min(float(b.min()), 0.0)) + 1.0
    offsets = np.asarray(class_ids, dtype=np.float32).reshape(-1, 1) * span
    return nms(b + offsets, scores, iou_threshold)
