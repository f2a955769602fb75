"""The tracker's per-frame arithmetic, compiled by numba: association and the Kalman steps.

Written in NumPy, one tracker update at 50 detections was about 235 NumPy calls of a few
microseconds each, and its p99 sat at the 1 ms budget on a slow machine with no single cost to
cut (docs/tracking.md). These loops do the same work, in the same floating-point operations and
order, so they give the same numbers to the bit (no fast-math: no reassociation, no fused
multiply-add) and the tracker the same tracks: ``bench_tracking --against`` a revision before
them found no frame with other tracks, and the tests compare the IoU with ``box_iou`` and the
Kalman steps with their 8x8 matrix form.

The optimal assignment of a round whose candidate pairs conflict (a track or a detection in
two of them) is still scipy's ``linear_sum_assignment``, called from the compiled loop.

Compiled on first use and cached on disk (``_compiled``); ``warm`` compiles, or loads, every
kernel on a tiny frame, and ``TrackerPool`` calls it when made: the server makes one when a frame
first asks for tracks, or at start with ``--preload-tracker`` (``server.trackers``). Each
kernel is compiled for one signature: callers pass ``kernel_array``s and floats, since an array
of another layout, a read-only one or an int would compile another, mid-stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

try:
    import numba
except ImportError as exc:  # pragma: no cover - the server and test installs have it
    raise ImportError(
        "perception's tracker needs numba, one of perception's own dependencies (pip install numba)"
    ) from exc
from scipy.optimize import linear_sum_assignment

_log = logging.getLogger(__name__)

# The codes of the tracker's track states (tracker.py's state array).
NEW, CONFIRMED, COASTING = 0, 1, 2
# Rows of the (N, 3, 4) Kalman covariance: per coordinate, its variance, its covariance with
# its own rate, the rate's variance (kalman.py).
PP, PV, VV = 0, 1, 2
# The smallest side, in pixels, that noise is scaled by: a degenerate (zero-width) box must not
# make a covariance singular.
MIN_SIDE_PX = 1.0
# Added to every allowed pair's weight, so a pair at exactly the gate is still matched.
_TIE = 1e-6
_TINY = np.float32(1e-30)
_KERNELS: list[str] = []  # the names of the compiled functions, in the order defined


def kernel_array(a: Any, dtype: type[np.generic]) -> NDArray[Any]:
    """``a`` as a C-contiguous, writable array of ``dtype``: the one array type the kernels are
    compiled for (a copy only where ``a`` is not one already)."""
    return np.require(a, dtype, ["C", "W"])


def _compiled(fn: Callable[..., Any]) -> Any:
    """``fn`` compiled by numba on its first call, cached on disk where numba finds a writable
    place (beside the source, ``NUMBA_CACHE_DIR``, or the user's cache directory): a cached
    compile loads in a fraction of a second, a fresh one takes seconds. With none (a read-only
    install and no ``NUMBA_CACHE_DIR``), compiled anew in each process."""
    _KERNELS.append(fn.__name__)
    try:
        return numba.njit(cache=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(cache=False)(fn)


@_compiled
def pairwise_iou(a: NDArray[np.float32], b: NDArray[np.float32]) -> NDArray[np.float32]:
    """(N, M) IoU of (N, 4) and (M, 4) float32 xyxy boxes: ``perception.boxes.box_iou`` to
    the bit (the same float32 operations in the same order)."""
    n, m = a.shape[0], b.shape[0]
    out = np.empty((n, m), np.float32)
    zero = np.float32(0.0)
    for i in range(n):
        ax1, ay1, ax2, ay2 = a[i, 0], a[i, 1], a[i, 2], a[i, 3]
        area_a = max(ax2 - ax1, zero) * max(ay2 - ay1, zero)
        for j in range(m):
            bx1, by1, bx2, by2 = b[j, 0], b[j, 1], b[j, 2], b[j, 3]
            w = max(min(ax2, bx2) - max(ax1, bx1), zero)
            h = max(min(ay2, by2) - max(ay1, by1), zero)
            inter = w * h
            area_b = max(bx2 - bx1, zero) * max(by2 - by1, zero)
            union = (area_a + area_b) - inter
            out[i, j] = inter / max(union, _TINY)
    return out


@_compiled
def _widened(xyxy: NDArray[np.float64], buffer: float) -> NDArray[np.float32]:
    """The boxes grown on each side by ``buffer`` times their own width and height, in float64,
    then as float32 (as ``box_iou`` casts its input)."""
    out = np.empty(xyxy.shape, np.float32)
    for i in range(xyxy.shape[0]):
        pw = (xyxy[i, 2] - xyxy[i, 0]) * buffer
        ph = (xyxy[i, 3] - xyxy[i, 1]) * buffer
        out[i, 0] = xyxy[i, 0] - pw
        out[i, 1] = xyxy[i, 1] - ph
        out[i, 2] = xyxy[i, 2] + pw
        out[i, 3] = xyxy[i, 3] + ph
    return out


@_compiled
def _solve(dense: NDArray[np.float64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    with numba.objmode(i="int64[:]", j="int64[:]"):
        i, j = linear_sum_assignment(dense, maximize=True)
        i, j = i.astype(np.int64), j.astype(np.int64)
    return i, j


@_compiled
def match_allowed(
    rows: NDArray[np.int64], cols: NDArray[np.int64], iou: NDArray[np.float64], min_iou: float,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``assignment.match_allowed``: the optimal gated matching of allowed pairs (row-major,
    IoU at or above ``min_iou`` > 0); the matched pairs, rows ascending."""
    k = rows.shape[0]
    n_cols = 0
    for p in range(k):
        n_cols = max(n_cols, cols[p] + 1)
    col_index = np.full(n_cols, -1, np.int64)
    conflict = False
    for p in range(k):
        if (p > 0 and rows[p] == rows[p - 1]) or col_index[cols[p]] == 0:
            conflict = True
        col_index[cols[p]] = 0
    if not conflict:
        return rows, cols
    # The dense matrix of the rows and the columns that have a pair, both ascending.
    used = np.empty(n_cols, np.int64)
    n_used = 0
    for c in range(n_cols):
        if col_index[c] == 0:
            col_index[c] = n_used
            used[n_used] = c
            n_used += 1
    row_ids = np.empty(k, np.int64)
    n_rows = 0
    for p in range(k):
        if p == 0 or rows[p] != rows[p - 1]:
            row_ids[n_rows] = rows[p]
            n_rows += 1
    dense = np.zeros((n_rows, n_used), np.float64)
    r = -1
    for p in range(k):
        if p == 0 or rows[p] != rows[p - 1]:
            r += 1
        dense[r, col_index[cols[p]]] = iou[p] - min_iou + _TIE
    i, j = _solve(dense)
    out_r = np.empty(i.shape[0], np.int64)
    out_c = np.empty(i.shape[0], np.int64)
    m = 0
    for q in range(i.shape[0]):
        if dense[i[q], j[q]] > 0:
            out_r[m], out_c[m] = row_ids[i[q]], used[j[q]]
            m += 1
    return out_r[:m], out_c[:m]


@_compiled
def _candidates(
    iou: NDArray[np.float32], track_cls: NDArray[np.int64], det_cls: NDArray[np.int64], gate32: np.float32,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """The pairs of one IoU matrix that some round could match: same class, IoU at or above
    the lowest gate (as float32); row-major."""
    n_t, n_d = iou.shape
    tracks = np.empty(n_t * n_d, np.int64)
    dets = np.empty(n_t * n_d, np.int64)
    values = np.empty(n_t * n_d, np.float64)
    k = 0
    for t in range(n_t):
        for d in range(n_d):
            if iou[t, d] >= gate32 and track_cls[t] == det_cls[d]:
                tracks[k], dets[k], values[k] = t, d, np.float64(iou[t, d])
                k += 1
    return tracks[:k], dets[:k], values[:k]


@_compiled
def _match_round(
    tracks: NDArray[np.int64], dets: NDArray[np.int64], iou: NDArray[np.float64],
    takers: NDArray[np.bool_], open_dets: NDArray[np.bool_], min_iou: float,
    free: NDArray[np.bool_], out_t: NDArray[np.int64], out_d: NDArray[np.int64], filled: int,
) -> int:
    """One round on one matrix's candidates: the pairs whose track may take a detection, whose
    detection is open and whose IoU is at least ``min_iou``, matched by ``match_allowed``.
    Marks the matched tracks taken and their detections closed, writes the pairs after
    ``filled`` and returns the new fill."""
    n = tracks.shape[0]
    rows = np.empty(n, np.int64)
    cols = np.empty(n, np.int64)
    vals = np.empty(n, np.float64)
    k = 0
    for p in range(n):
        if open_dets[dets[p]] and takers[tracks[p]] and iou[p] >= min_iou:
            rows[k], cols[k], vals[k] = tracks[p], dets[p], iou[p]
            k += 1
    if k == 0:
        return filled
    t, d = match_allowed(rows[:k], cols[:k], vals[:k], min_iou)
    for q in range(t.shape[0]):
        free[t[q]] = False
        open_dets[d[q]] = False
        out_t[filled], out_d[filled] = t[q], d[q]
        filled += 1
    return filled


@_compiled
def associate(
    mean: NDArray[np.float64], track_cls: NDArray[np.int64], before: NDArray[np.int8],
    boxes: NDArray[np.float64], det_cls: NDArray[np.int64],
    open_high: NDArray[np.bool_], open_low: NDArray[np.bool_],
    buffer: float, gate32: np.float32, gate: float, match_iou: float, low_match_iou: float,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.bool_]]:
    """Steps 3a-3c of a tracker update (tracker.py's module docstring): the (tracks, detections)
    pairs matched, in the order the rounds matched them, and which tracks are left free.
    ``open_high`` and ``open_low`` are the detections still open, updated in place.

    Each round matches on the plain IoU matrix's candidates, then (when ``buffer`` > 0) on the
    widened boxes', each pair at or above the round's IoU; ``gate32`` is the least float32 at
    or above ``gate``, the lowest round IoU, and candidates are the pairs at or above it."""
    n_t, n_d = mean.shape[0], boxes.shape[0]
    pred = np.empty((n_t, 4), np.float64)
    for t in range(n_t):
        hw, hh = max(mean[t, 2], 0.0) / 2, max(mean[t, 3], 0.0) / 2
        pred[t, 0], pred[t, 1] = mean[t, 0] - hw, mean[t, 1] - hh
        pred[t, 2], pred[t, 3] = mean[t, 0] + hw, mean[t, 1] + hh
    plain = _candidates(pairwise_iou(pred.astype(np.float32), boxes.astype(np.float32)), track_cls, det_cls, gate32)
    widened = plain
    n_mats = 1
    if buffer > 0:
        widened = _candidates(pairwise_iou(_widened(pred, buffer), _widened(boxes, buffer)), track_cls, det_cls,
                              gate32)
        n_mats = 2
    free = np.ones(n_t, np.bool_)
    out_t = np.empty(min(n_t, n_d), np.int64)
    out_d = np.empty(min(n_t, n_d), np.int64)
    filled = 0
    takers = np.empty(n_t, np.bool_)
    for rnd in range(3):
        min_iou = max(low_match_iou if rnd == 2 else match_iou, gate)
        open_dets = open_low if rnd == 2 else open_high
        for m in range(n_mats):
            anyone = False
            for t in range(n_t):
                s = before[t]
                eligible = (s != NEW) if rnd == 0 else ((s == NEW) if rnd == 1 else (s == CONFIRMED))
                takers[t] = free[t] and eligible
                anyone = anyone or takers[t]
            if not anyone:
                break
            tracks, dets, iou = plain if m == 0 else widened
            filled = _match_round(tracks, dets, iou, takers, open_dets, min_iou, free, out_t, out_d, filled)
    return out_t[:filled], out_d[:filled], free


@_compiled
def kalman_predict(
    mean: NDArray[np.float64], cov: NDArray[np.float64], dt: float, q_pos: float, q_vel: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``BoxKalmanFilter.predict`` to the bit: q_pos and q_vel are the squared process noises."""
    new_mean = mean.copy()
    new_cov = np.empty_like(cov)
    for i in range(mean.shape[0]):
        for c in range(4):
            new_mean[i, c] = mean[i, c] + dt * mean[i, 4 + c]
            side = max(abs(mean[i, 2 + (c % 2)]), MIN_SIDE_PX)
            side2 = side**2
            pp, pv, vv = cov[i, PP, c], cov[i, PV, c], cov[i, VV, c]
            new_cov[i, PP, c] = pp + dt * (2 * pv + dt * vv + q_pos * side2)
            new_cov[i, PV, c] = pv + dt * vv
            new_cov[i, VV, c] = vv + (dt * q_vel) * side2
    return new_mean, new_cov


@_compiled
def kalman_update(
    mean: NDArray[np.float64], cov: NDArray[np.float64], z: NDArray[np.float64], r: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``BoxKalmanFilter.update`` to the bit: r is the squared measurement noise."""
    new_mean = np.empty_like(mean)
    new_cov = np.empty_like(cov)
    for i in range(mean.shape[0]):
        for c in range(4):
            side = max(abs(mean[i, 2 + (c % 2)]), MIN_SIDE_PX)
            pp, pv, vv = cov[i, PP, c], cov[i, PV, c], cov[i, VV, c]
            s = pp + r * side**2
            kp, kv = pp / s, pv / s
            innovation = z[i, c] - mean[i, c]
            new_mean[i, c] = mean[i, c] + kp * innovation
            new_mean[i, 4 + c] = mean[i, 4 + c] + kv * innovation
            new_cov[i, PP, c] = pp - kp * pp
            new_cov[i, PV, c] = pv - kp * pv
            new_cov[i, VV, c] = vv - kv * pv
    return new_mean, new_cov


_warmed = False


def warm() -> None:
    """Compile (or load from the cache) every kernel, by running each on a tiny input that
    takes every path: a conflict that needs the solver, plain and widened boxes. Once per
    process; a second concurrent call compiles nothing twice (numba compiles under a lock).

    A cache that cannot be read or written (an index emptied by a power cut, a directory gone
    or full) would otherwise fail every start of the server: then the kernels are compiled
    again without a cache, and the reason logged."""
    global _warmed
    if _warmed:
        return
    try:
        _run_every_kernel()
    except Exception as exc:  # whatever numba's cache raised; a fault of the kernels raises again below
        _log.warning("the tracker's compiled loops could not use numba's cache (%s: %s); compiling them "
                     "without it", type(exc).__name__, exc)
        for name in _KERNELS:
            globals()[name] = numba.njit(cache=False)(globals()[name].py_func)
        _run_every_kernel()
    _warmed = True


def _run_every_kernel() -> None:
    mean = np.array([[10.0, 10, 8, 8, 1, 0, 0, 0], [12, 10, 8, 8, 0, 0, 0, 0]])
    cov = np.ones((2, 3, 4))
    mean, cov = kalman_predict(mean, cov, 0.03, 1.0, 1.0)
    boxes = np.array([[6.0, 6, 14, 14], [7, 6, 15, 14]])
    cls = np.zeros(2, np.int64)
    before = np.array([1, 0], np.int8)
    for buffer in (0.0, 0.1):
        associate(mean, cls, before, boxes, cls, np.ones(2, np.bool_), np.zeros(2, np.bool_), buffer,
                  np.float32(0.1), 0.1, 0.2, 0.1)
    kalman_update(mean, cov, mean[:, :4].copy(), 1.0)
