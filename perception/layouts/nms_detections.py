"""``nms_detections``: a model with NMS inside its graph, built from standard ONNX ops (ONNX
exports with NMS included, torchvision-style two-stage exports; the outputs follow TensorRT's
EfficientNMS naming, but its ``EfficientNMS_TRT`` plugin op itself is refused at import: no
onnxruntime kernel runs it).

Outputs: ``num_dets (B, 1)`` (optional: without it every row counts), ``boxes (B, K, 4)``
``x1, y1, x2, y2`` in model-input pixels, ``scores (B, K)``, ``classes (B, K)`` (ints or floats;
``class_offset`` in the manifest is subtracted, 1 for exports whose class 0 is the background).
The server's own NMS is skipped; the request's score threshold, class filter and max
detections still apply. A row whose class id is outside the model's classes (after the offset)
is dropped, and the first such row is logged: a torchvision export imported without
``--class-offset 1`` would otherwise lose its last class and shift the others in silence.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from perception.errors import ModelError
from perception.layouts.base import DecodeContext, RoleArrays, TensorInfo, describe, find_output, static_dim
from perception.options import PostprocessOptions
from perception.types import Detections

log = logging.getLogger(__name__)
_told_out_of_range = False  # the first class id out of range is logged, once per process

NAMES = {
    "num_dets": ("num_dets", "num_detections", "num"),
    "boxes": ("det_boxes", "detection_boxes", "boxes", "bboxes"),
    "scores": ("det_scores", "detection_scores", "scores"),
    "classes": ("det_classes", "detection_classes", "labels", "classes"),
}


class NmsDetections:
    name = "nms_detections"
    roles: tuple[str, ...] = ("num_dets", "boxes", "scores", "classes")
    applies_nms = False

    def bind(self, outputs: Sequence[TensorInfo], mapping: Mapping[str, str], num_classes: int) -> dict[str, str]:
        found: dict[str, TensorInfo] = {}
        taken: set[str] = set()
        for role in ("boxes", "num_dets", "scores", "classes"):
            info = find_output(self.name, role, outputs, mapping, NAMES[role], taken)
            if info is not None:
                found[role] = info
                taken.add(info.name)
        rest = [o for o in outputs if o.name not in taken]
        if "boxes" not in found:
            fours = [o for o in rest if len(o.shape) == 3 and static_dim(o, -1) in (4, None)]
            if len(fours) == 1:
                found["boxes"] = fours[0]
                rest.remove(fours[0])
        if "num_dets" not in found:
            ones = [o for o in rest if len(o.shape) == 2 and static_dim(o, -1) == 1]
            if len(ones) == 1:
                found["num_dets"] = ones[0]
                rest.remove(ones[0])
        pairs = [o for o in rest if len(o.shape) == 2]
        if "scores" not in found:
            floats = [o for o in pairs if o.dtype.startswith("float")]
            if len(floats) == 1:
                found["scores"] = floats[0]
                pairs.remove(floats[0])
        if "classes" not in found:
            ints = [o for o in pairs if not o.dtype.startswith("float")] or pairs
            if len(ints) == 1:
                found["classes"] = ints[0]
        missing = [r for r in ("boxes", "scores", "classes") if r not in found]
        if missing:
            raise ModelError(f"layout {self.name} cannot tell which output is {', '.join(missing)} among "
                             f"{describe(outputs)}: map them explicitly (boxes=NAME, scores=NAME, classes=NAME)")
        b = found["boxes"]
        if len(b.shape) != 3 or static_dim(b, -1) not in (4, None):
            raise ModelError(f"layout {self.name}: output {b.name!r} has shape {list(b.shape)}, expected (B, K, 4)")
        for role in ("scores", "classes"):
            o = found[role]
            if len(o.shape) != 2:
                raise ModelError(f"layout {self.name}: output {o.name!r} ({role}) has shape {list(o.shape)}, "
                                 "expected (B, K)")
        return {role: info.name for role, info in found.items()}

    def candidates(
        self, outputs: RoleArrays, options: PostprocessOptions, num_classes: int, ctx: DecodeContext | None = None
    ) -> Detections:
        boxes = np.asarray(outputs["boxes"], np.float32)
        scores = np.asarray(outputs["scores"], np.float32).reshape(-1)
        classes = np.asarray(outputs["classes"]).reshape(-1)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not scores.shape[0] == boxes.shape[0] == classes.shape[0]:
            raise ModelError(f"layout {self.name}: expected one image's boxes (K, 4), scores (K,) and classes (K,), "
                             f"got {boxes.shape}, {scores.shape} and {classes.shape}")
        n = _counted(outputs, boxes.shape[0])
        offset = ctx.class_offset if ctx is not None else 0
        cls = np.rint(classes[:n]).astype(np.int64) - offset
        in_range = (cls >= 0) & (cls < num_classes)
        keep = scores[:n] >= options.score_threshold
        if not in_range[keep].all():  # over the rows that count (padding rows score 0)
            _tell_out_of_range(int(cls[keep & ~in_range][0]), num_classes, offset)
        keep &= in_range
        if options.class_filter:
            keep &= np.isin(cls, options.class_filter)
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            return Detections.empty()
        return Detections(boxes[idx], scores[idx], cls[idx])

    def parts(self, outputs: RoleArrays) -> dict[str, tuple[str, NDArray[np.generic]]]:
        # The rows past num_dets are padding, whatever they hold: never read, never judged.
        n = _counted(outputs, np.asarray(outputs["boxes"]).shape[0])
        return {role: (role, np.asarray(outputs[role])[:n]) for role in ("boxes", "scores", "classes")}


def _counted(outputs: RoleArrays, rows: int) -> int:
    """How many of one image's ``rows`` are detections: ``num_dets`` of them, else all."""
    if "num_dets" not in outputs:
        return rows
    count = np.asarray(outputs["num_dets"]).reshape(-1)
    if count.size == 0 or not np.isfinite(count[0]):
        # A float count of NaN made int() raise ValueError: a crash, not the model's fault named.
        raise ModelError(f"the model's detection count (num_dets) is {count[0] if count.size else 'empty'}, "
                         "not a number of rows: it computes nothing usable on this runtime")
    return max(0, min(rows, int(count[0])))


def _tell_out_of_range(class_id: int, num_classes: int, offset: int) -> None:
    global _told_out_of_range
    if _told_out_of_range:
        return
    _told_out_of_range = True
    hint = (" Its ids may start at 1 (torchvision, background 0): import it with --class-offset 1."
            if offset == 0 and class_id == num_classes else "")
    log.warning("the model gave class id %d (after class offset %d), outside its %d classes: such detections are "
                "dropped (logged once).%s", class_id, offset, num_classes, hint)

