"""Effective post-processing options of one request: thresholds, limits and class filter.

Kept apart from the manifest so the output-layout decoders can take them without importing
the manifest (which itself validates layout names against the decoder registry).
"""

from __future__ import annotations

from dataclasses import dataclass

from perception.errors import InvalidInputError

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
