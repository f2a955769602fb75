"""Operators of the two-stage family, written here so they export to plain ONNX (no torchvision,
no custom ops) and run the same in eager PyTorch and ONNX Runtime.

* ``BoxCoder``: Fast R-CNN box deltas (dx, dy, dw, dh) of a box against a reference box,
  scaled by weights (10, 10, 5, 5) so the deltas of typical matches are about unit size.
* ``nms``: greedy NMS as a ``torch.autograd.Function`` whose eager ``forward`` is a greedy loop
  and whose ``symbolic`` is ONNX ``NonMaxSuppression`` with the selection gathered back. The
  eager loop copies ONNX Runtime's semantics, so export parity holds: candidates need a score
  strictly above ``score_threshold``, a box is suppressed by a kept one when their IoU is
  strictly greater than ``iou_threshold`` (boxes without area never suppress), score ties keep
  the lower index first, selection stops at ``max_output`` boxes.
* ``roi_align``: RoIAlign (He et al. 2017, the half-pixel "aligned" variant of Detectron2):
  each output bin averages ``sampling_ratio`` x ``sampling_ratio`` bilinear samples at evenly
  spaced points, computed as two matrix products (exports as MatMul; see its docstring).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

# Fast R-CNN's delta weights: centre offsets in tenths of the reference size, log-sizes in fifths.
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Largest log-size delta decoded (Detectron2's clamp): exp(4.135) = 62.5x the reference size.
# An untrained head's large deltas would otherwise overflow exp().
MAX_LOG_SCALE = math.log(1000.0 / 16)
# Reference boxes are at least this wide / tall (input px), so a box clipped to nothing at the
# image border still has finite deltas.
MIN_REF_SIZE = 1.0


class BoxCoder:
    """Encode boxes as deltas against reference boxes and decode them back (xyxy, input px)."""

    def __init__(self, weights: tuple[float, float, float, float] = BOX_WEIGHTS) -> None:
        self.weights = weights

    @staticmethod
    def _centre_size(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        w = (b[..., 2] - b[..., 0]).clamp(min=MIN_REF_SIZE)
        h = (b[..., 3] - b[..., 1]).clamp(min=MIN_REF_SIZE)
        return (b[..., 0] + b[..., 2]) * 0.5, (b[..., 1] + b[..., 3]) * 0.5, w, h

    def encode(self, boxes: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """(..., 4) deltas of ``boxes`` against ``ref`` (both (..., 4) xyxy)."""
        wx, wy, ww, wh = self.weights
        rx, ry, rw, rh = self._centre_size(ref)
        bx, by, bw, bh = self._centre_size(boxes)
        return torch.stack([wx * (bx - rx) / rw, wy * (by - ry) / rh, ww * torch.log(bw / rw),
                            wh * torch.log(bh / rh)], -1)

    def decode(self, deltas: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """(..., 4) xyxy boxes from ``deltas`` (..., 4) against ``ref`` (broadcastable to deltas)."""
        wx, wy, ww, wh = self.weights
        rx, ry, rw, rh = self._centre_size(ref)
        cx = deltas[..., 0] / wx * rw + rx
        cy = deltas[..., 1] / wy * rh + ry
        w = torch.exp((deltas[..., 2] / ww).clamp(max=MAX_LOG_SCALE)) * rw
        h = torch.exp((deltas[..., 3] / wh).clamp(max=MAX_LOG_SCALE)) * rh
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def clip_boxes(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Boxes (..., 4) clipped to the image [0, width] x [0, height]."""
    x = boxes[..., 0::2].clamp(0.0, float(width))
    y = boxes[..., 1::2].clamp(0.0, float(height))
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, best first, ties to the lower index: ONNX Runtime's
    TopK order, which ``torch.topk`` does not promise (a stable sort does; it cannot export)."""
    if torch.jit.is_tracing():
        return scores.topk(k).indices
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def nms_overlaps(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """(N, N) bool: IoU > ``iou_threshold`` (>= 0) as ONNX Runtime's NonMaxSuppression decides
    it: corners in either order, and a box without area overlaps nothing."""
    lo = torch.minimum(boxes[:, :2], boxes[:, 2:])
    hi = torch.maximum(boxes[:, :2], boxes[:, 2:])
    area = (hi[:, 0] - lo[:, 0]) * (hi[:, 1] - lo[:, 1])
    inter = (torch.minimum(hi[:, None], hi[None]) - torch.maximum(lo[:, None], lo[None])).clamp(min=0).prod(-1)
    # Without intersection the ratio is 0 (or 0 / 0 = NaN for two empty boxes): never above.
    over = inter / (area[:, None] + area[None] - inter) > iou_threshold
    has_area = area > 0
    return over & has_area[:, None] & has_area[None]


def greedy_nms(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float, max_output: int
) -> torch.Tensor:
    """Indices (K,) int64 of the boxes greedy NMS keeps, highest score first (see the module
    docstring for the exact semantics, ONNX Runtime's)."""
    cand = (scores > score_threshold).nonzero(as_tuple=True)[0]
    if cand.numel() == 0 or max_output <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = cand[torch.sort(scores[cand], descending=True, stable=True).indices]
    over: np.ndarray = nms_overlaps(boxes[order].float(), iou_threshold).numpy()
    removed = np.zeros(order.numel(), dtype=bool)
    keep: list[int] = []
    # A Python loop over numpy rows: a few microseconds per candidate, cheaper than any
    # vectorised formulation for the few hundred candidates it sees.
    for i in range(order.numel()):
        if removed[i]:
            continue
        keep.append(i)
        if len(keep) == max_output:
            break
        removed |= over[i]
    return order[torch.tensor(keep, dtype=torch.long)]


class _NMS(torch.autograd.Function):
    """Greedy NMS in eager mode, ONNX ``NonMaxSuppression`` in an exported graph."""

    @staticmethod
    def forward(
        ctx: Any, boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float,
        max_output: int,
    ) -> torch.Tensor:
        return greedy_nms(boxes, scores, iou_threshold, score_threshold, max_output)

    @staticmethod
    def symbolic(
        g: Any, boxes: Any, scores: Any, iou_threshold: float, score_threshold: float, max_output: int
    ) -> Any:
        """boxes (N, 4), scores (N,) -> NonMaxSuppression on batch 1, class 1 -> column 2 of the
        (K, 3) selection: (K,) box indices in selection order."""
        b = g.op("Unsqueeze", boxes, g.op("Constant", value_t=torch.tensor([0])))
        s = g.op("Unsqueeze", scores, g.op("Constant", value_t=torch.tensor([0, 1])))
        sel = g.op(
            "NonMaxSuppression", b, s,
            g.op("Constant", value_t=torch.tensor([max_output], dtype=torch.long)),
            g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float)),
            g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float)),
            center_point_box_i=0,
        )
        return g.op("Gather", sel, g.op("Constant", value_t=torch.tensor(2)), axis_i=1)


def nms(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float, max_output: int
) -> torch.Tensor:
    """Kept indices (K,) int64, highest score first, of greedy NMS over boxes (N, 4) xyxy and
    scores (N,); exports as ONNX NonMaxSuppression."""
    out: torch.Tensor = _NMS.apply(boxes, scores, float(iou_threshold), float(score_threshold), int(max_output))
    return out


def _bin_weights(lo: torch.Tensor, hi: torch.Tensor, bins: int, ratio: int, size: int, stride: int) -> torch.Tensor:
    """(R, bins, size): along one axis, each bin's average bilinear weight on each map cell.

    Sample k of n = bins * ratio across [lo, hi] (input px) lies at lo + (k + 0.5) (hi - lo) / n,
    feature coordinate p = x / stride - 0.5 (cell centres at integers), clamped to the map
    (border values beyond it); its bilinear weight on cell i is max(0, 1 - |p - i|).
    """
    n = bins * ratio
    t = (torch.arange(n, dtype=lo.dtype) + 0.5) / n
    pos = ((lo[:, None] + t * (hi - lo)[:, None]) / stride - 0.5).clamp(0.0, size - 1.0)  # (R, n)
    w = (1.0 - (pos[:, :, None] - torch.arange(size, dtype=lo.dtype)).abs()).clamp(min=0.0)  # (R, n, size)
    return w.reshape(-1, bins, ratio, size).mean(2)


def roi_align(
    feature: torch.Tensor, rois: torch.Tensor, stride: int, output_size: int = 7, sampling_ratio: int = 2
) -> torch.Tensor:
    """RoIAlign of one image: feature (1, C, Hf, Wf) at ``stride``, rois (R, 4) xyxy input px
    -> (R, C, output_size, output_size); each bin averages sampling_ratio^2 bilinear samples.

    Bilinear sampling and the bin average are separable and linear, so the pooled map is
    Ay F Ax^T per RoI and channel, with Ay (P, Hf) and Ax (P, Wf) from ``_bin_weights``: two
    matrix products (ONNX MatMul) instead of a gather per sample. That is more arithmetic
    (R P Hf C Wf multiply-adds, 103 M for 100 RoIs on the 36x64x64 stride-8 map of a 512x288
    input) but dense: measured in ONNX Runtime with one thread, 2.0 ms against 18.3 ms for the
    same RoIAlign as GridSample, and 5.7 against 7.3 ms for a training forward + backward of
    64 RoIs in PyTorch. The dense products grow with the map area, so a much larger input would
    want the gather form back.
    """
    _, c, hf, wf = feature.shape
    p = output_size
    ay = _bin_weights(rois[:, 1], rois[:, 3], p, sampling_ratio, hf, stride)  # (R, P, Hf)
    ax = _bin_weights(rois[:, 0], rois[:, 2], p, sampling_ratio, wf, stride)  # (R, Q, Wf)
    rows = torch.matmul(ay.reshape(-1, hf), feature[0].permute(1, 0, 2).reshape(hf, c * wf))  # (R P, C Wf)
    pooled = torch.matmul(rows.reshape(-1, p * c, wf), ax.transpose(1, 2))  # (R, P C, Q)
    return pooled.reshape(-1, p, c, p).permute(0, 2, 1, 3)
