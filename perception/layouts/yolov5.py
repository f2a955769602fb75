"""``yolov5``: the YOLOv5-family export (also YOLOv7 and the like).

One output ``(B, N, 5 + C)``: ``cx, cy, w, h`` in model-input pixels, objectness, then per-class
scores, both already through a sigmoid. score = objectness x the best class's score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from perception.boxes import cxcywh_to_xyxy
from perception.errors import ModelError
from perception.layouts.base import DecodeContext, RoleArrays, TensorInfo, bind_one_rank3
from perception.layouts.yolo_obj import objectness_candidates, objectness_parts
from perception.options import PostprocessOptions
from perception.types import Detections

# What the family's exporters name the output.
NAMES = ("output0", "output", "predictions")


class YoloV5:
    name = "yolov5"
    roles: tuple[str, ...] = ("predictions",)
    applies_nms = True

    def bind(self, outputs: Sequence[TensorInfo], mapping: Mapping[str, str], num_classes: int) -> dict[str, str]:
        return bind_one_rank3(self.name, outputs, mapping, NAMES, -1, 5 + num_classes,
                              f"(B, N, {5 + num_classes}) for {num_classes} classes")

    def candidates(
        self, outputs: RoleArrays, options: PostprocessOptions, num_classes: int, ctx: DecodeContext | None = None
    ) -> Detections:
        out = np.asarray(outputs["predictions"], np.float32)
        if out.ndim != 2 or out.shape[1] != 5 + num_classes:
            raise ModelError(f"layout {self.name}: expected one image's output (N, {5 + num_classes}), got {out.shape}")
        return objectness_candidates(out, cxcywh_to_xyxy(out[:, :4]), options)

    def parts(self, outputs: RoleArrays) -> dict[str, tuple[str, NDArray[np.generic]]]:
        return objectness_parts(outputs)
