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
    m = np.asarray(iou, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"iou must be a 2-D matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("iou must be finite")
    rows, cols = np.nonzero(m >= min_iou)
    return match_pairs(rows, cols, m[rows, cols], min_iou)


def match_pairs(
    rows: NDArray[np.integer], cols: NDArray[np.integer], iou: NDArray[np.floating], min_iou: float
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``match_by_iou`` on a sparse matrix: the candidate pairs (``rows[k]``, ``cols[k]``) with
    IoU ``iou[k]``, in row-major order (rows ascending, then columns; as ``np.nonzero`` gives),
    each pair at most once (not checked: the tracker's pairs come from ``np.nonzero``, and a
    check would cost what this saves); a pair not listed has IoU 0. Returns the matched pairs,
    rows ascending.

    When no row and no column is in two allowed pairs, every allowed pair is the optimum and
    no solver runs (the common case in a sparse scene). Otherwise the solver gets the dense
    matrix of the rows and columns that have an allowed pair, in ascending order.
    """
    if min_iou <= 0:
        raise ValueError(f"min_iou must be > 0, got {min_iou}")
    values = np.asarray(iou, dtype=np.float64)
    allowed = values >= min_iou
    r = np.asarray(rows, dtype=np.int64)[allowed]
    c = np.asarray(cols, dtype=np.int64)[allowed]
    return match_allowed(r, c, values[allowed], min_iou)


def match_allowed(
    rows: NDArray[np.int64], cols: NDArray[np.int64], iou: NDArray[np.float64], min_iou: float
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``match_pairs`` of pairs that are all allowed (int64 indices in row-major order, float64
    IoU at or above ``min_iou`` > 0): what the tracker calls, having filtered its pairs in the
    same pass as its own conditions."""
    if rows.size < 2 or not ((rows[1:] == rows[:-1]).any() or np.bincount(cols).max() > 1):
        return rows, cols
    weight = iou - min_iou + _TIE
    first = np.ones((rows.size,), bool)  # the first pair of each row (rows come ascending)
    np.not_equal(rows[1:], rows[:-1], out=first[1:])
    used = np.zeros((int(cols.max()) + 1,), bool)
    used[cols] = True
    dense = np.zeros((int(first.sum()), int(used.sum())), np.float64)
    dense[np.cumsum(first) - 1, (np.cumsum(used) - 1)[cols]] = weight
    i, j = linear_sum_assignment(dense, maximize=True)
    keep = dense[i, j] > 0
    return rows[first][i[keep]], np.flatnonzero(used)[j[keep]]
