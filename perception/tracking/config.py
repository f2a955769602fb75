"""The tracker's settings: one frozen dataclass, checked on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from perception.errors import ConfigError


@dataclass(frozen=True)
class TrackerConfig:
    """How detections become tracks, per camera, and how many cameras are remembered.

    high_score: detections scoring at least this are matched first and may start tracks.
    low_score: detections scoring in [low_score, high_score) only extend tracks that were
        matched on the previous frame (ByteTrack's second association); below it they are ignored.
    match_iou: least IoU for a high-score detection to match a track's predicted box.
    low_match_iou: least IoU for a low-score detection (stricter: such boxes are less reliable).
    buffer_per_s: what plain IoU leaves unmatched gets a second matching, by the IoU of boxes
        (prediction and detection) widened on each side by this many times their own width
        and height per second since the previous frame: the buffered IoU of C-BIoU tracking.
        An object that moves more than its size between two frames (a sign passing at 10 fps,
        or any object across a dropped frame) still overlaps its prediction; 0 turns it off.
        In a crowd of objects crossing in every direction it pairs more wrong neighbours
        (docs/tracking.md): there, 0 is the better setting.
    max_buffer: the most a box is widened, in its own sizes per side.
    confirm_hits: matches (birth included) on consecutive frames before a new track is
        confirmed; a new track missed once before that is dropped.
    max_age_s: a track not matched for longer than this (capture time) is dropped.
    max_tracks: live tracks per camera, coasting ones included (bounds memory per camera).
    ttl_s: a camera with no frame for this long (server monotonic clock) is forgotten.
    max_cameras: cameras remembered at once; past it the least recently updated is forgotten.

    The defaults follow ByteTrack (high 0.5, low 0.1, IoU 0.2 then 0.5; 30 frames lost at
    30 fps = 1 s; confirmed on the second match); max_tracks is twice the manifests' default
    max_detections (100) so that coasting tracks fit beside a full frame. The buffer (8 per
    second, so 0.8 box sizes per side at 10 fps, 0.27 at 30 fps; at most 2) was chosen on the
    generated drives with the shipped model (bench/bench_mot.py, docs/tracking.md).
    """

    high_score: float = 0.5
    low_score: float = 0.1
    match_iou: float = 0.2
    low_match_iou: float = 0.5
    buffer_per_s: float = 8.0
    max_buffer: float = 2.0
    confirm_hits: int = 2
    max_age_s: float = 1.0
    max_tracks: int = 200
    ttl_s: float = 60.0
    max_cameras: int = 64

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"TrackerConfig.{f.name} must be a finite number, got {value!r}")
        for name in ("confirm_hits", "max_tracks", "max_cameras"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"TrackerConfig.{name} must be an integer >= 1, got {value!r}")
        if not 0 < self.low_score <= self.high_score <= 1:
            raise ConfigError(
                f"TrackerConfig needs 0 < low_score <= high_score <= 1, got {self.low_score} and {self.high_score}"
            )
        for name in ("match_iou", "low_match_iou"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"TrackerConfig.{name} must be in (0, 1], got {value}")
        if self.buffer_per_s < 0 or self.max_buffer < 0:
            raise ConfigError(f"TrackerConfig.buffer_per_s and max_buffer must be >= 0, got {self.buffer_per_s} "
                              f"and {self.max_buffer}")
        if self.max_age_s <= 0:
            raise ConfigError(f"TrackerConfig.max_age_s must be > 0, got {self.max_age_s}")
        if self.ttl_s < self.max_age_s:
            # A forgotten camera loses tracks that could still have been re-acquired.
            raise ConfigError(f"TrackerConfig.ttl_s ({self.ttl_s}) must be >= max_age_s ({self.max_age_s})")
