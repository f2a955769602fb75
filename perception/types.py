"""Domain types shared by build, serve and replay. Arrays, not per-box objects."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

import numpy as np
from numpy.typing import NDArray


class FrameStatus(str, Enum):
    """What became of one frame, end to end (perception.v1.FrameStatus without its prefix).

    The value is the name written to JSONL and shown to users.
    """

    OK = "OK"
    DROPPED_STALE = "DROPPED_STALE"  # a newer frame of the same camera replaced it
    EXPIRED = "EXPIRED"  # its deadline passed before it was answered
    INVALID = "INVALID"  # it could not be decoded, or its options are invalid
    OVERLOADED = "OVERLOADED"  # shed under load (or not processed): send the next one

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Detections:
    """Detections of one image.

    boxes: (N, 4) float32, x1 y1 x2 y2 in pixels of the image they refer to.
    scores: (N,) float32 in [0, 1].
    class_ids: (N,) int64.
    """

    boxes: NDArray[np.float32]
    scores: NDArray[np.float32]
    class_ids: NDArray[np.int64]

    def __post_init__(self) -> None:
        n = self.boxes.shape[0]
        if self.boxes.shape != (n, 4) or self.scores.shape != (n,) or self.class_ids.shape != (n,):
            raise ValueError(
                f"inconsistent detection arrays: boxes {self.boxes.shape}, "
                f"scores {self.scores.shape}, class_ids {self.class_ids.shape}"
            )

    @classmethod
    def empty(cls) -> Detections:
        return cls(
            np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64)
        )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def take(self, index: NDArray[np.int64] | NDArray[np.bool_]) -> Detections:
        return Detections(self.boxes[index], self.scores[index], self.class_ids[index])


@dataclass(frozen=True)
class StageTimings:
    """Server-side wall-clock time of one frame per pipeline stage, in microseconds, and how
    many frames shared its inference call. Mirrors perception.v1.StageTimings."""

    queue_us: int = 0
    preprocess_us: int = 0
    inference_us: int = 0
    postprocess_us: int = 0
    total_us: int = 0
    batch_size: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
