"""An annotated video of one camera: boxes, class labels and scores, and an overlay with the
frame's client round trip and server time. Frames are decoded on the client only for this.

A frame with tracks (``--track``) colours each box by its track id, the same colour for the
same id in every frame, and labels it ``#id``; an untracked box (id 0) is grey."""

from __future__ import annotations

import colorsys
import logging
import os
import threading
from pathlib import Path

import cv2
import numpy as np

from client.client_status import Unanswered
from client.frames import FrameResult, FrameStatus, SourceFrame
from perception.decode import decode_encoded, decode_raw
from perception.errors import DataError, InvalidInputError

log = logging.getLogger(__name__)


# The golden ratio's fraction in 64-bit fixed point: hue steps computed exactly, whatever the id.
_GOLDEN_64 = 0x9E3779B97F4A7C15


def class_color(class_id: int) -> tuple[int, int, int]:
    """A distinct, stable BGR colour per class id (golden-ratio hue steps). In integers: a
    track id is about 1.8e15 (``first_id_from_clock``), where ``id * 0.618`` in a double keeps
    steps of 0.125, so every track on screen took one of eight hues."""
    h = (int(class_id) * _GOLDEN_64 % (1 << 64)) / float(1 << 64)
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
    return int(b * 255), int(g * 255), int(r * 255)


UNTRACKED_COLOR = (160, 160, 160)  # BGR: a detection the tracker gave no id


def track_color(track_id: int) -> tuple[int, int, int]:
    """A stable BGR colour per track id (golden-ratio hue steps, so consecutive ids, the ones
    most often on screen together, differ most); grey for 0, not tracked."""
    if track_id == 0:
        return UNTRACKED_COLOR
    return class_color(track_id)


def frame_image(frame: SourceFrame) -> np.ndarray:
    """The frame's pixels as BGR uint8 (H, W, 3)."""
    if frame.encoded is not None:
        img, _, _ = decode_encoded(frame.encoded)
        return img
    raw = frame.raw
    assert raw is not None
    return decode_raw(raw.data, raw.width, raw.height, int(raw.pixel_format), raw.row_stride)


def annotate(image: np.ndarray, result: FrameResult) -> np.ndarray:
    """Draw ``result`` onto a copy of ``image`` (BGR)."""
    out = image.copy()
    h = out.shape[0]
    thick = max(1, h // 360)
    font = max(0.35, h / 1400)
    dets = result.detections
    track_ids = result.tracks.ids.tolist() if result.tracks is not None else [None] * len(dets)
    for box, score, cid, name, tid in zip(
        dets.boxes, dets.scores, dets.class_ids, result.class_names, track_ids, strict=True
    ):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        color = class_color(int(cid)) if tid is None else track_color(tid)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thick)
        label = f"{name or cid} {float(score):.2f}"
        if tid:
            label = f"#{tid} {label}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font, 1)
        ty = max(th + base, y1)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw + 2, ty), color, -1)
        cv2.putText(out, label, (x1 + 1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), 1, cv2.LINE_AA)
    server_ms = result.timings.total_us / 1e3
    text = (
        f"{result.camera_id} #{result.sequence}  rt {result.latency_ms:.1f} ms  server {server_ms:.1f} ms"
        f"  {len(result.detections)} det"
    )
    if result.status is not FrameStatus.OK:
        text += f"  {result.status.value}"
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, 1)
    cv2.rectangle(out, (0, 0), (tw + 8, th + base + 8), (0, 0, 0), -1)
    cv2.putText(out, text, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255), 1, cv2.LINE_AA)
    return out


class AnnotatedVideoSink:
    """Writes the frames of ``camera_id`` (default: the first camera answered) to an MP4/AVI.

    Frames of another size than the first are resized to it; frames that cannot be decoded
    (the server said INVALID) are skipped. The file is created at the first frame written, so
    a video without frames is an error at ``close()``, not a missing file nobody mentions.
    """

    def __init__(self, path: str | os.PathLike[str], fps: float = 10.0, camera_id: str = "") -> None:
        self.path = Path(path)
        self.fps = fps if fps > 0 else 10.0
        self.camera_id = camera_id
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._cameras: set[str] = set()  # every camera with a record, to name them when camera_id has none
        self._closed = False
        self.frames = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"{self.path}: cannot write: {exc.strerror}") from exc

    def write(self, frame: SourceFrame, result: FrameResult) -> None:
        with self._lock:
            self._cameras.add(frame.camera_id)
            if not self.camera_id:
                self.camera_id = frame.camera_id
            if frame.camera_id != self.camera_id:
                return
            try:
                img = frame_image(frame)
            except InvalidInputError:
                return
            if self._writer is None:
                self._size = (img.shape[1], img.shape[0])
                fourcc = "MJPG" if self.path.suffix.lower() == ".avi" else "mp4v"
                self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter.fourcc(*fourcc), self.fps, self._size)
                if not self._writer.isOpened():
                    raise DataError(f"{self.path}: OpenCV cannot write this video file")
            img = annotate(img, result)  # boxes are in this frame's pixels: drawn before any resize
            if (img.shape[1], img.shape[0]) != self._size:  # a camera that changed resolution mid-drive
                img = cv2.resize(img, self._size)
            self._writer.write(img)
            self.frames += 1

    def write_unanswered(self, record: Unanswered) -> None:
        """Only notes the camera: the video shows what the server answered (the JSONL says what it did not)."""
        with self._lock:
            self._cameras.add(record.camera_id)

    def close(self) -> None:
        """Finish the video. DataError if it has no frame (no file was written): the replay has
        no camera ``camera_id``, or none of its frames was answered with an image to draw."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._writer is not None:
                self._writer.release()
                self._writer = None
                return
            if not self.camera_id:
                problem = "no frame was answered"
            elif self.camera_id not in self._cameras:
                cameras = ", ".join(sorted(self._cameras)) or "none"
                problem = f"the replay has no camera {self.camera_id!r} (its cameras: {cameras})"
            else:
                problem = f"no frame of camera {self.camera_id!r} was answered with an image to draw"
            raise DataError(f"{self.path}: not written: {problem}")

    def discard(self) -> None:
        """Close without writing, for a replay that never started: the file is created at the
        first frame, so there is none to remove."""
        with self._lock:
            self._closed = True
