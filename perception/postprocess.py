"""The one post-processing implementation: model output -> detections in source pixels.

Vectorised: candidates are cut by score and a pre-NMS top-k before the (costlier) NMS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from perception.errors import InvalidInputError
from perception.letterbox import Letterbox, boxes_to_source
from perception.manifest import PostprocessSpec
from perception.nms import batched_nms
from perception.types import Detections

# A request may not ask for more than this many detections: the head has a few thousand
# candidates at most, and an unbounded value would only let a client allocate memory.
MAX_DETECTIONS_LIMIT = 10_000


@dataclass(frozen=True)
class PostprocessOptions:
    """Effective per-request options (request values merged over the manifest's defaults)."""

    score_threshold: float
    iou_threshold: float
    max_detections: int
    pre_nms_topk: int
    class_agnostic: bool = False
    class_filter: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not (0.0 <= self.score_threshold <= 1.0):
            raise InvalidInputError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if not (0.0 < self.iou_threshold <= 1.0):
            raise InvalidInputError(f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if not (1 <= self.max_detections <= MAX_DETECTIONS_LIMIT):
            raise InvalidInputError(
                f"max_detections must be in 1..{MAX_DETECTIONS_LIMIT}, got {self.max_detections}"
            )
        if self.pre_nms_topk < 1:
            raise InvalidInputError(f"pre_nms_topk must be positive, got {self.pre_nms_topk}")

    @classmethod
    def from_spec(cls, spec: PostprocessSpec) -> "PostprocessOptions":
        return cls(
            score_threshold=spec.score_threshold,
            iou_threshold=spec.iou_threshold,
            max_detections=spec.max_detections,
            pre_nms_topk=spec.pre_nms_topk,
            class_agnostic=spec.class_agnostic,
        )


def merge_options(
    spec: PostprocessSpec,
    num_classes: int,
    score_threshold: float = 0.0,
    iou_threshold: float = 0.0,
    max_detections: int = 0,
    class_filter: tuple[int, ...] = (),
    class_agnostic: bool | None = None,
) -> PostprocessOptions:
    """Request options over manifest defaults; a zero value means "use the default".

    Raises InvalidInputError on absurd values (negative thresholds, unknown class ids, ...).
    """
    for name, value in (("score_threshold", score_threshold), ("iou_threshold", iou_threshold)):
        if not np.isfinite(value) or value < 0:
            raise InvalidInputError(f"{name} must be a finite value >= 0, got {value}")
    bad = [c for c in class_filter if c < 0 or c >= num_classes]
    if bad:
        raise InvalidInputError(f"class_filter has class ids {bad} outside 0..{num_classes - 1}")
    return PostprocessOptions(
        score_threshold=score_threshold or spec.score_threshold,
        iou_threshold=iou_threshold or spec.iou_threshold,
        max_detections=max_detections or spec.max_detections,
        pre_nms_topk=spec.pre_nms_topk,
        class_agnostic=spec.class_agnostic if class_agnostic is None else class_agnostic,
        class_filter=tuple(sorted(set(class_filter))),
    )


def decode_candidates(
    output: NDArray[np.floating], options: PostprocessOptions
) -> Detections:
    """Decode one image's raw head output (N, 5 + C), layout ``xyxy_obj_cls``, into
    candidates in model-input pixels: best class per anchor, score = obj x cls, cut by
    threshold, class filter and pre-NMS top-k. No NMS yet.
    """
    out = np.asarray(output)
    if out.ndim != 2 or out.shape[1] < 6:
        raise ValueError(f"expected a (N, 5 + C) output, got {out.shape}")
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
    boxes = out[idx, :4].astype(np.float32)
    return Detections(boxes, scores, cls_id.astype(np.int64))


def postprocess(
    output: NDArray[np.floating], letterbox: Letterbox, options: PostprocessOptions
) -> Detections:
    """Detections of one image in source pixels, clipped, sorted by score, at most max_detections."""
    cand = decode_candidates(output, options)
    if len(cand) == 0:
        return cand
    keep = batched_nms(cand.boxes, cand.scores, cand.class_ids, options.iou_threshold, options.class_agnostic)
    keep = keep[: options.max_detections]
    kept = cand.take(keep)
    boxes = boxes_to_source(kept.boxes, letterbox, clip=True)
    return Detections(boxes, kept.scores, kept.class_ids)
