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

from perception.tracking import kernels


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
    each pair at most once (not checked); a pair not listed has IoU 0. Returns the matched pairs,
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
    IoU at or above ``min_iou`` > 0). The compiled ``kernels.match_allowed``, which the
    tracker's rounds call from their own compiled loop."""
    r, c = kernels.kernel_array(rows, np.int64), kernels.kernel_array(cols, np.int64)
    if (r.size and r.min() < 0) or (c.size and c.min() < 0):
        raise ValueError("row and column indices must be >= 0")
    return kernels.match_allowed(r, c, kernels.kernel_array(iou, np.float64), float(min_iou))
