"""``yolov8``: the YOLOv8 / YOLO11-family export.

One output ``(B, 4 + C, N)``, channel-first as that family exports it: ``cx, cy, w, h`` in
model-input pixels, then per-class scores (already through a sigmoid); no objectness.
score = the best class's score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from perception.boxes import cxcywh_to_xyxy
from perception.errors import ModelError
from perception.layouts.base import DecodeContext, RoleArrays, TensorInfo, bind_one_rank3, top_candidates
from perception.options import PostprocessOptions
from perception.types import Detections

NAMES = ("output0", "output", "predictions")


class YoloV8:
    name = "yolov8"
    roles: tuple[str, ...] = ("predictions",)
    applies_nms = True

    def bind(self, outputs: Sequence[TensorInfo], mapping: Mapping[str, str], num_classes: int) -> dict[str, str]:
        return bind_one_rank3(self.name, outputs, mapping, NAMES, 1, 4 + num_classes,
                              f"(B, {4 + num_classes}, N) for {num_classes} classes")

    def candidates(
        self, outputs: RoleArrays, options: PostprocessOptions, num_classes: int, ctx: DecodeContext | None = None
    ) -> Detections:
        out = np.asarray(outputs["predictions"], np.float32)
        if out.ndim != 2 or out.shape[0] != 4 + num_classes:
            raise ModelError(f"layout {self.name}: expected one image's output ({4 + num_classes}, N), got {out.shape}")
        cls = out[4:]
        if options.class_filter:
            mask = np.zeros(num_classes, bool)
            mask[list(options.class_filter)] = True
            cls = np.where(mask[:, None], cls, 0.0)
        cls_id = cls.argmax(axis=0)
        scores = cls[cls_id, np.arange(cls.shape[1])]
        idx = np.flatnonzero(scores >= options.score_threshold)
        if idx.size == 0:
            return Detections.empty()
        return top_candidates(cxcywh_to_xyxy(out[:4, idx].T), scores[idx], cls_id[idx], options)

    def parts(self, outputs: RoleArrays) -> dict[str, tuple[str, NDArray[np.generic]]]:
        out = np.asarray(outputs["predictions"])
        return {"boxes": ("predictions", out[:4]), "scores": ("predictions", out[4:])}
