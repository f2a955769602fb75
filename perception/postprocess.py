"""The one post-processing implementation: a model's outputs -> detections in source pixels.

The output layout's decoder (``perception.layouts``) turns one image's outputs into
candidates in model-input pixels, already cut by score and a pre-NMS top-k (NMS in numpy
costs as much as a small model over thousands of candidates: ``docs/performance.md``); then
NMS (unless the model did it in its graph), the max-detections cut, and the letterbox inverse.
"""

from __future__ import annotations

import numpy as np

from perception.errors import InvalidInputError
from perception.layouts.base import DecodeContext, LayoutDecoder, RoleArrays
from perception.letterbox import Letterbox, boxes_to_source
from perception.manifest import PostprocessSpec
from perception.nms import batched_nms
from perception.options import MAX_DETECTIONS_LIMIT, PostprocessOptions
from perception.types import Detections

__all__ = ["MAX_DETECTIONS_LIMIT", "PostprocessOptions", "merge_options", "options_from_spec", "postprocess"]


def options_from_spec(spec: PostprocessSpec) -> PostprocessOptions:
    """The manifest's defaults as effective options."""
    return PostprocessOptions(
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
    if len(class_filter) > num_classes:
        # More ids than classes means repeats: refuse before building anything from them.
        raise InvalidInputError(f"class_filter has {len(class_filter)} entries for {num_classes} classes")
    bad = [c for c in class_filter if c < 0 or c >= num_classes]
    if bad:
        raise InvalidInputError(f"class_filter has class ids {bad[:8]} outside 0..{num_classes - 1}")
    return PostprocessOptions(
        score_threshold=score_threshold or spec.score_threshold,
        iou_threshold=iou_threshold or spec.iou_threshold,
        max_detections=max_detections or spec.max_detections,
        pre_nms_topk=spec.pre_nms_topk,
        class_agnostic=spec.class_agnostic if class_agnostic is None else class_agnostic,
        class_filter=tuple(sorted(set(class_filter))),
    )


def postprocess(
    outputs: RoleArrays, letterbox: Letterbox, options: PostprocessOptions, decoder: LayoutDecoder, num_classes: int,
    ctx: DecodeContext | None = None, image_size: tuple[int, int] | None = None,
) -> Detections:
    """Detections of one image in source pixels, clipped, sorted by score, at most max_detections.

    outputs: this image's outputs by the decoder's roles (batch axis taken off).
    image_size: (width, height) of the true source image, when the letterbox's placement spans
    more (a reduced-scale decode: ``FramePipeline.prepare``); boxes are clipped to it rather
    than to ``letterbox.src_w x letterbox.src_h``.
    """
    cand = decoder.candidates(outputs, options, num_classes, ctx)
    # A NaN or inf box (a diverged export, an overflowing decode) must not reach NMS: one NaN
    # makes every class-offset box NaN (nothing is suppressed), an inf one suppresses across
    # classes; nor a client. One pass over the few candidates left after the score cut.
    finite = np.isfinite(cand.boxes).all(axis=1) & np.isfinite(cand.scores)
    if not finite.all():
        cand = cand.take(finite)
    if len(cand) == 0:
        return cand
    if decoder.applies_nms:
        keep = batched_nms(cand.boxes, cand.scores, cand.class_ids, options.iou_threshold, options.class_agnostic)
    else:
        keep = np.argsort(-cand.scores, kind="stable")
    kept = cand.take(keep)
    boxes = boxes_to_source(kept.boxes, letterbox, clip=True, image_size=image_size)
    # A box wholly in the letterbox's padding, or wholly past the true image edge of a
    # reduced-scale decode, clips to nothing: it is no detection, and must not take one of the
    # max_detections places from a real one.
    real = np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))[: options.max_detections]
    return Detections(boxes[real], kept.scores[real], kept.class_ids[real])
