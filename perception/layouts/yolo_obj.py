"""``yolo_obj``: this project's own head.

One output ``(B, N, 5 + C)``: ``x1, y1, x2, y2`` in model-input pixels, objectness, then
per-class probabilities, both already passed through a sigmoid. score = objectness x class
probability of the best class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from perception.errors import ModelError
from perception.layouts.base import DecodeContext, RoleArrays, TensorInfo, bind_single, static_dim
from perception.options import PostprocessOptions
from perception.types import Detections


class YoloObj:
    name = "yolo_obj"
    roles: tuple[str, ...] = ("predictions",)
    applies_nms = True

    def bind(self, outputs: Sequence[TensorInfo], mapping: Mapping[str, str], num_classes: int) -> dict[str, str]:
        bound = bind_single(self.name, outputs, mapping, "predictions")
        info = next(o for o in outputs if o.name == bound["predictions"])
        last = static_dim(info, -1)
        if len(info.shape) != 3 or (last is not None and last != 5 + num_classes):
            raise ModelError(f"layout {self.name}: output {info.name!r} has shape {list(info.shape)}, "
                             f"expected (B, N, {5 + num_classes}) for {num_classes} classes")
        return bound

    def candidates(
        self, outputs: RoleArrays, options: PostprocessOptions, num_classes: int, ctx: DecodeContext | None = None
    ) -> Detections:
        out = np.asarray(outputs["predictions"], np.float32)
        if out.ndim != 2 or out.shape[1] != 5 + num_classes:
            raise ModelError(f"layout {self.name}: expected one image's output (N, {5 + num_classes}), got {out.shape}")
        return objectness_candidates(out, out[:, :4], options)

    def parts(self, outputs: RoleArrays) -> dict[str, tuple[str, NDArray[np.generic]]]:
        return objectness_parts(outputs)


def objectness_parts(outputs: RoleArrays) -> dict[str, tuple[str, NDArray[np.generic]]]:
    """What an objectness head's one-image output ``(N, 5 + C)`` holds, column by column."""
    out = np.asarray(outputs["predictions"])
    return {"boxes": ("predictions", out[:, :4]), "objectness": ("predictions", out[:, 4]),
            "scores": ("predictions", out[:, 5:])}


def objectness_candidates(
    out: NDArray[np.floating], boxes_xyxy: NDArray[np.floating], options: PostprocessOptions
) -> Detections:
    """Candidates of an objectness head ``(N, 5 + C)`` (obj at column 4, class probabilities
    after it) whose boxes, as corners in model-input pixels, are ``boxes_xyxy`` (N, 4)."""
    obj = out[:, 4]
    # Cheap first cut on objectness alone: score = obj * cls <= obj.
    idx = np.flatnonzero(obj >= options.score_threshold)
    if idx.size == 0:
        return Detections.empty()
    cls_prob = out[idx, 5:]
    if options.class_filter:
        mask = np.zeros(cls_prob.shape[1], bool)
        mask[list(options.class_filter)] = True
        cls_prob = np.where(mask[None, :], cls_prob, 0.0)
    cls_id = cls_prob.argmax(axis=1)
    scores = (obj[idx] * cls_prob[np.arange(idx.size), cls_id]).astype(np.float32)
    keep = scores >= options.score_threshold
    if options.class_filter:
        keep &= np.isin(cls_id, options.class_filter)
    idx, cls_id, scores = idx[keep], cls_id[keep], scores[keep]
    if idx.size > options.pre_nms_topk:
        top = np.argpartition(-scores, options.pre_nms_topk - 1)[: options.pre_nms_topk]
        idx, cls_id, scores = idx[top], cls_id[top], scores[top]
    return Detections(np.asarray(boxes_xyxy[idx], np.float32), scores, cls_id.astype(np.int64))
