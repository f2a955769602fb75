"""Gated one-to-one matching of tracks to detections on an IoU matrix (the Hungarian step).

The matching maximises the sum of ``iou - min_iou`` over matched pairs, pairs below
``min_iou`` being forbidden. That is ByteTrack's rule (``lap.lapjv`` with a cost limit): a
pair is left unmatched rather than matched badly, and one confident match is not traded for
two marginal ones, as a maximum-cardinality rule would. With non-negative weights a full
rectangular assignment that maximises the weight is such a matching once its zero-weight
pairs are dropped, so scipy's ``linear_sum_assignment`` solves it; rows and columns with no
allowed pair are taken out first, which keeps the solved matrix small in a sparse scene.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment

# Added to every allowed pair's weight, so a pair at exactly min_iou is still matched.
_TIE = 1e-6


def match_by_iou(
    iou: NDArray[np.floating], min_iou: float
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Row and column indices of the matched pairs of an (R, C) IoU matrix, rows ascending.

    Pairs with IoU < ``min_iou`` (``min_iou`` > 0) are never matched: zero the entries of
    pairs that must not match (another class) before calling. Empty input gives empty output.
    """
    if min_iou <= 0:
        raise ValueError(f"min_iou must be > 0, got {min_iou}")
    m = np.asarray(iou, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"iou must be a 2-D matrix, got shape {m.shape}")
    allowed = m >= min_iou
    if not allowed.any():
        return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
    rows = np.flatnonzero(allowed.any(axis=1))
    cols = np.flatnonzero(allowed.any(axis=0))
    sub = m[rows[:, None], cols]
    sub_allowed = sub >= min_iou
    weight = np.where(sub_allowed, sub - min_iou + _TIE, 0.0)
    r, c = linear_sum_assignment(weight, maximize=True)
    keep = sub_allowed[r, c]
    return rows[r[keep]].astype(np.int64), cols[c[keep]].astype(np.int64)
