"""``ssd``: single-shot detectors with a background class.

Two outputs: ``boxes (B, N, 4)`` and ``scores (B, N, C + 1)``, class 0 the background and the
scores already probabilities (softmax or sigmoid). The boxes are either already decoded
(``x1, y1, x2, y2`` normalised to 0..1 of the model input), or, when the manifest names a
prior-box file, raw offsets ``(dx, dy, dw, dh)`` against those priors (``cx, cy, w, h``,
normalised) with the two variances: ``cx = pcx + dx * v0 * pw``, ``w = pw * exp(dw * v1)``.
Every (box, class) pair above the threshold is a candidate, as SSD's own post-processing does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from perception.errors import ModelError
from perception.layouts.base import (
    DecodeContext,
    RoleArrays,
    TensorInfo,
    describe,
    find_output,
    static_dim,
    top_candidates,
)
from perception.options import PostprocessOptions
from perception.types import Detections

BOX_NAMES = ("boxes", "bboxes", "locations", "loc", "box_regression")
SCORE_NAMES = ("scores", "confidences", "conf", "class_scores")


def decode_offsets(
    offsets: NDArray[np.floating], priors: NDArray[np.floating], variances: tuple[float, float]
) -> NDArray[np.float32]:
    """SSD box offsets (N, 4) against priors (N, 4) cx cy w h -> corners (N, 4), normalised."""
    d = np.asarray(offsets, np.float32)
    p = np.asarray(priors, np.float32)
    cx = p[:, 0] + d[:, 0] * variances[0] * p[:, 2]
    cy = p[:, 1] + d[:, 1] * variances[0] * p[:, 3]
    # exp of an absurd offset would overflow to inf; a box larger than the image is as bad.
    w = p[:, 2] * np.exp(np.clip(d[:, 2] * variances[1], -20.0, 20.0))
    h = p[:, 3] * np.exp(np.clip(d[:, 3] * variances[1], -20.0, 20.0))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)


class Ssd:
    name = "ssd"
    roles: tuple[str, ...] = ("boxes", "scores")
    applies_nms = True

    def bind(self, outputs: Sequence[TensorInfo], mapping: Mapping[str, str], num_classes: int) -> dict[str, str]:
        boxes = find_output(self.name, "boxes", outputs, mapping, BOX_NAMES, set())
        scores = find_output(self.name, "scores", outputs, mapping, SCORE_NAMES, {boxes.name} if boxes else set())
        rank3 = [o for o in outputs if len(o.shape) == 3]
        if boxes is None:
            fours = [o for o in rank3 if static_dim(o, -1) == 4 and o is not scores]
            boxes = fours[0] if len(fours) == 1 else None
        if scores is None:
            rest = [o for o in rank3 if o is not boxes]
            scores = rest[0] if len(rest) == 1 else None
        if boxes is None or scores is None:
            raise ModelError(f"layout {self.name} needs boxes (B, N, 4) and scores (B, N, C + 1); the model has "
                             f"{describe(outputs)}: map them explicitly (boxes=NAME, scores=NAME)")
        if len(boxes.shape) != 3 or static_dim(boxes, -1) not in (4, None):
            raise ModelError(f"layout {self.name}: output {boxes.name!r} has shape {list(boxes.shape)}, "
                             "expected (B, N, 4)")
        last = static_dim(scores, -1)
        if len(scores.shape) != 3 or (last is not None and last != num_classes + 1):
            raise ModelError(f"layout {self.name}: output {scores.name!r} has shape {list(scores.shape)}, expected "
                             f"(B, N, {num_classes + 1}) for {num_classes} classes plus the background")
        return {"boxes": boxes.name, "scores": scores.name}

    def candidates(
        self, outputs: RoleArrays, options: PostprocessOptions, num_classes: int, ctx: DecodeContext | None = None
    ) -> Detections:
        if ctx is None:
            raise ModelError(f"layout {self.name} needs the model's input size to read its boxes")
        boxes = np.asarray(outputs["boxes"], np.float32)
        scores = np.asarray(outputs["scores"], np.float32)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0], num_classes + 1):
            raise ModelError(f"layout {self.name}: expected one image's boxes (N, 4) and scores "
                             f"(N, {num_classes + 1}), "
                             f"got {boxes.shape} and {scores.shape}")
        if ctx.priors is not None:
            if ctx.priors.shape != boxes.shape:
                raise ModelError(f"layout {self.name}: {boxes.shape[0]} box offsets but {ctx.priors.shape[0]} priors")
            boxes = decode_offsets(boxes, ctx.priors, ctx.variances)
        cls = scores[:, 1:]
        anchor, cls_id = np.nonzero(cls >= options.score_threshold)
        if anchor.size == 0:
            return Detections.empty()
        scale = np.array([ctx.input_width, ctx.input_height, ctx.input_width, ctx.input_height], np.float32)
        return top_candidates(boxes[anchor] * scale, cls[anchor, cls_id], cls_id, options)

    def parts(self, outputs: RoleArrays) -> dict[str, tuple[str, NDArray[np.generic]]]:
        return {role: (role, np.asarray(outputs[role])) for role in self.roles}


def implausible_outputs(outputs: RoleArrays, ctx: DecodeContext) -> str:
    """Why one frame's SSD outputs do not read as this layout says (empty if they do).

    Nothing in the shapes tells decoded corners from raw offsets, or probabilities from logits,
    and both read without error: raw offsets (what outputs named ``loc`` or ``box_regression``
    usually hold) come out as boxes anywhere, logits as scores above 1. Decoded corners that
    leave -1..2 (a box more than an image's width outside it) and scores outside 0..1 cannot be
    what the layout reads; the import checks one frame with this and refuses the model."""
    problems = []
    scores = np.asarray(outputs["scores"], np.float32)
    s = scores[np.isfinite(scores)]
    if s.size and (float(s.min()) < -1e-3 or float(s.max()) > 1 + 1e-3):
        problems.append(f"scores range {float(s.min()):.3g}..{float(s.max()):.3g}, not probabilities (logits?): "
                        "export the softmax'd (or sigmoid'd) scores")
    if ctx.priors is None:
        boxes = np.asarray(outputs["boxes"], np.float32)
        b = boxes[np.isfinite(boxes)]
        if b.size and (float(b.min()) < -1.0 or float(b.max()) > 2.0):
            problems.append(f"boxes range {float(b.min()):.3g}..{float(b.max()):.3g}, not corners normalised to 0..1: "
                            "raw offsets against prior boxes need --priors PRIORS.npy (and --variances)")
    return "; ".join(problems)
