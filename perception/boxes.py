"""Pure box functions. Boxes are (N, 4) float arrays, x1 y1 x2 y2, in pixels."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def box_area(boxes: NDArray[np.floating]) -> NDArray[np.float32]:
    """(N,) areas of (N, 4) xyxy boxes; degenerate boxes have area 0."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(a: NDArray[np.floating], b: NDArray[np.floating]) -> NDArray[np.float32]:
    """(N, M) IoU matrix between (N, 4) and (M, 4) xyxy boxes. Empty inputs give empty output."""
    a = np.asarray(a, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0).astype(np.float32)


def xywh_to_xyxy(boxes: NDArray[np.floating]) -> NDArray[np.float32]:
    """Top-left x, y, width, height (COCO) -> x1 y1 x2 y2."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, 2:] += b[:, :2]
    return b


def xyxy_to_xywh(boxes: NDArray[np.floating]) -> NDArray[np.float32]:
    """x1 y1 x2 y2 -> top-left x, y, width, height (COCO)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, 2:] -= b[:, :2]
    return b


def cxcywh_to_xyxy(boxes: NDArray[np.floating]) -> NDArray[np.float32]:
    """Centre x, y, width, height (YOLO) -> x1 y1 x2 y2."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    half = b[:, 2:] / 2
    return np.concatenate([b[:, :2] - half, b[:, :2] + half], axis=1).astype(np.float32)
