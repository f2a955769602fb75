"""A replay as an MCAP file that Foxglove opens with the detections drawn on the images
(``perception replay ... --mcap-out OUT.mcap``).

Per camera, two channels, JSON-encoded with JSON Schemas (``jsonschema`` / ``json``), so no
ROS or protobuf tooling is needed to read them back:

- ``/<camera_id>/image``: ``foxglove.CompressedImage`` {timestamp, frame_id = camera id,
  data (base64), format}. JPEG and PNG frames are written as recorded (the exact bytes sent);
  raw frames (decoded video, ``sensor_msgs/Image``) are encoded as JPEG for this file only.
- ``/<camera_id>/detections``: ``foxglove.ImageAnnotations`` {points, texts}: each box a
  ``LINE_LOOP`` of its four corners (x1,y1 x2,y1 x2,y2 x1,y2, source-image pixels as the server
  returned them, rounded like the JSONL), each label ``"<class> <score>"``, ``"#<track id>
  <class> <score>"`` for a tracked detection (``--track``), at the box's top-left corner. The
  colours are the annotated video's: per class, or per track id with ``--track``.

Log and publish time of both = the frame's capture timestamp, so an Image panel showing
``/<camera>/image`` with ``/<camera>/detections`` pairs them exactly.

Frames the server answered with a status other than OK (dropped stale, expired, invalid,
overloaded) get their image and no annotation message: an empty annotation would say "nothing
detected", which the server never said; the JSONL has the status. Frames never answered
(client statuses: NOT_SENT, GIVEN_UP, ...) get nothing: their record carries no pixels.

Written whole or not at all: into a temporary file beside the target, renamed over it by
``close()`` after the MCAP summary is written and synced, so the target is never a half
file. ``close()`` after Ctrl-C publishes the frames answered so far (like the other outputs);
after a failed write it discards the temporary file (the write error is what gets reported).
``discard()``, for a replay that never started, removes the temporary file: an empty MCAP
must not replace an earlier run's.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import IO, Any

import cv2

from client.client_status import Unanswered
from client.frames import FrameResult, FrameStatus, SourceFrame
from client.sinks.annotated_video import class_color, frame_image, track_color
from client.sinks.atomic_json import temp_beside
from perception.errors import DataError, InvalidInputError

log = logging.getLogger(__name__)

SCHEMA_ENCODING = "jsonschema"
MESSAGE_ENCODING = "json"
IMAGE_SCHEMA_NAME = "foxglove.CompressedImage"
ANNOTATIONS_SCHEMA_NAME = "foxglove.ImageAnnotations"
LINE_LOOP = 2  # foxglove.PointsAnnotationType: closed polygon 0-1, 1-2, ..., n-0
RAW_JPEG_QUALITY = 90  # raw frames only; encoded frames are written as recorded

# Minimal JSON Schemas of the Foxglove message types, with the fields this sink writes (the
# field names are Foxglove's: https://docs.foxglove.dev/docs/sdk/schemas/image-annotations).
_TIME: dict[str, Any] = {
    "type": "object",
    "title": "time",
    "properties": {
        "sec": {"type": "integer", "minimum": 0},
        "nsec": {"type": "integer", "minimum": 0, "maximum": 999_999_999},
    },
}
_POINT2: dict[str, Any] = {
    "title": "foxglove.Point2",
    "type": "object",
    "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
}
_COLOR: dict[str, Any] = {
    "title": "foxglove.Color",
    "type": "object",
    "properties": {c: {"type": "number", "minimum": 0, "maximum": 1} for c in "rgba"},
}
COMPRESSED_IMAGE_SCHEMA: dict[str, Any] = {
    "title": IMAGE_SCHEMA_NAME,
    "description": "A compressed image",
    "type": "object",
    "properties": {
        "timestamp": _TIME,
        "frame_id": {"type": "string"},
        "data": {"type": "string", "contentEncoding": "base64"},
        "format": {"type": "string"},
    },
}
IMAGE_ANNOTATIONS_SCHEMA: dict[str, Any] = {
    "title": ANNOTATIONS_SCHEMA_NAME,
    "description": "Array of annotations for a 2D image",
    "type": "object",
    "properties": {
        "circles": {"type": "array", "items": {"title": "foxglove.CircleAnnotation", "type": "object"}},
        "points": {
            "type": "array",
            "items": {
                "title": "foxglove.PointsAnnotation",
                "type": "object",
                "properties": {
                    "timestamp": _TIME,
                    "type": {
                        "title": "foxglove.PointsAnnotationType",
                        "oneOf": [
                            {"title": "UNKNOWN", "const": 0},
                            {"title": "POINTS", "const": 1},
                            {"title": "LINE_LOOP", "const": 2},
                            {"title": "LINE_STRIP", "const": 3},
                            {"title": "LINE_LIST", "const": 4},
                        ],
                    },
                    "points": {"type": "array", "items": _POINT2},
                    "outline_color": _COLOR,
                    "outline_colors": {"type": "array", "items": _COLOR},
                    "fill_color": _COLOR,
                    "thickness": {"type": "number"},
                },
            },
        },
        "texts": {
            "type": "array",
            "items": {
                "title": "foxglove.TextAnnotation",
                "type": "object",
                "properties": {
                    "timestamp": _TIME,
                    "position": _POINT2,
                    "text": {"type": "string"},
                    "font_size": {"type": "number"},
                    "text_color": _COLOR,
                    "background_color": _COLOR,
                },
            },
        },
    },
}

_BLACK = {"r": 0.0, "g": 0.0, "b": 0.0, "a": 1.0}
_TRANSPARENT = {"r": 0.0, "g": 0.0, "b": 0.0, "a": 0.0}


def image_topic(camera_id: str) -> str:
    return f"/{camera_id}/image"


def detections_topic(camera_id: str) -> str:
    return f"/{camera_id}/detections"


def foxglove_time(ns: int) -> dict[str, int]:
    """Foxglove's JSON time {sec, nsec} of a nanosecond timestamp."""
    return {"sec": ns // 1_000_000_000, "nsec": ns % 1_000_000_000}


def _rgba(bgr: tuple[int, int, int]) -> dict[str, float]:
    """An OpenCV BGR colour (the annotated video's) as a Foxglove colour (RGBA in [0, 1])."""
    b, g, r = bgr
    return {"r": round(r / 255, 4), "g": round(g / 255, 4), "b": round(b / 255, 4), "a": 1.0}


def label_text(class_name: str, class_id: int, score: float, track_id: int | None) -> str:
    """The label of a box, as on the annotated video: "car 0.87", "#12 car 0.87" when tracked."""
    label = f"{class_name or class_id} {score:.2f}"
    return f"#{track_id} {label}" if track_id else label


def image_message(frame: SourceFrame) -> dict[str, Any] | None:
    """The frame as a foxglove.CompressedImage; None for raw pixels that cannot be decoded."""
    data = frame.encoded
    if data is not None:
        fmt = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpeg"  # sources send only JPEG or PNG encoded
    else:
        try:
            img = frame_image(frame)
        except InvalidInputError:  # the server said INVALID too; the JSONL says why
            return None
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, RAW_JPEG_QUALITY])
        if not ok:
            return None
        data, fmt = buf.tobytes(), "jpeg"
    return {
        "timestamp": foxglove_time(frame.timestamp_ns),
        "frame_id": frame.camera_id,
        "data": base64.b64encode(data).decode("ascii"),
        "format": fmt,
    }


def annotations_message(result: FrameResult, timestamp_ns: int) -> dict[str, Any]:
    """The answer's detections as a foxglove.ImageAnnotations: a LINE_LOOP and a label per box."""
    stamp = foxglove_time(timestamp_ns)
    font_size = max(12.0, round(result.image_height / 40, 1)) if result.image_height else 12.0
    thickness = float(max(1, round(result.image_height / 360))) if result.image_height else 2.0
    dets = result.detections
    track_ids: list[int | None] = (
        list(result.tracks.ids.tolist()) if result.tracks is not None else [None] * len(dets)
    )
    points: list[dict[str, Any]] = []
    texts: list[dict[str, Any]] = []
    for box, score, cid, name, tid in zip(
        dets.boxes, dets.scores, dets.class_ids, result.class_names, track_ids, strict=True
    ):
        x1, y1, x2, y2 = (round(float(v), 2) for v in box)  # as the JSONL has them
        color = _rgba(class_color(int(cid)) if tid is None else track_color(int(tid)))
        points.append({
            "timestamp": stamp,
            "type": LINE_LOOP,
            "points": [{"x": x1, "y": y1}, {"x": x2, "y": y1}, {"x": x2, "y": y2}, {"x": x1, "y": y2}],
            "outline_color": color,
            "outline_colors": [],
            "fill_color": _TRANSPARENT,
            "thickness": thickness,
        })
        texts.append({
            "timestamp": stamp,
            # Bottom-left of the text: on the box's top edge, kept inside the image at the top.
            "position": {"x": x1, "y": max(y1, font_size)},
            "text": label_text(name, int(cid), float(score), tid),
            "font_size": font_size,
            "text_color": _BLACK,
            "background_color": color,
        })
    return {"circles": [], "points": points, "texts": texts}


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


class McapAnnotationsSink:
    """Writes each answered frame's image and, for an OK answer, its detections (see the
    module docstring for the layout) to ``path``, through a temporary file renamed by close()."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from mcap.writer import Writer

        self.path = Path(path)
        self._lock = threading.Lock()
        self._channels: dict[str, int] = {}  # topic -> channel id
        self._sequence: dict[int, int] = {}  # channel id -> messages written
        self._failed = False
        self.images = 0
        self.annotations = 0
        if self.path.is_dir():
            raise DataError(f"{self.path}: cannot write: is a directory")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = temp_beside(self.path)
        except OSError as exc:
            raise DataError(f"{self.path}: cannot write: {exc.strerror or exc}") from exc
        self._tmp = Path(tmp)
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")
        try:
            self._writer = Writer(self._file)
            self._writer.start()
            self._image_schema = self._writer.register_schema(
                IMAGE_SCHEMA_NAME, SCHEMA_ENCODING, _encode(COMPRESSED_IMAGE_SCHEMA)
            )
            self._annotations_schema = self._writer.register_schema(
                ANNOTATIONS_SCHEMA_NAME, SCHEMA_ENCODING, _encode(IMAGE_ANNOTATIONS_SCHEMA)
            )
        except BaseException as exc:
            self._discard()
            if isinstance(exc, OSError):
                raise DataError(f"{self.path}: cannot write: {exc.strerror or exc}") from exc
            raise

    def write(self, frame: SourceFrame, result: FrameResult) -> None:
        image = image_message(frame)
        annotations = annotations_message(result, frame.timestamp_ns) if result.status is FrameStatus.OK else None
        with self._lock:
            if self._file is None:
                raise DataError(f"{self.path}: write after close")
            if self._failed:  # answers still in flight after the failed write: the file is discarded anyway
                return
            try:
                if image is not None:
                    self._add(image_topic(frame.camera_id), self._image_schema, image, frame.timestamp_ns)
                    self.images += 1
                if annotations is not None:
                    self._add(
                        detections_topic(frame.camera_id), self._annotations_schema, annotations, frame.timestamp_ns
                    )
                    self.annotations += 1
            except OSError as exc:
                self._failed = True
                raise DataError(f"{self.path}: cannot write: {exc.strerror or exc}") from exc
            except BaseException:
                self._failed = True  # the MCAP writer's state is unknown: do not publish the file
                raise

    def write_unanswered(self, record: Unanswered) -> None:
        """Nothing: the record carries no pixels (the JSONL says which frames were not answered)."""

    def _add(self, topic: str, schema_id: int, message: dict[str, Any], log_time: int) -> None:
        channel = self._channels.get(topic)
        if channel is None:
            channel = self._channels[topic] = self._writer.register_channel(topic, MESSAGE_ENCODING, schema_id)
        seq = self._sequence.get(channel, 0)
        self._sequence[channel] = seq + 1
        self._writer.add_message(channel, log_time=log_time, data=_encode(message), publish_time=log_time,
                                 sequence=seq)

    def close(self) -> None:
        """Finish the MCAP (summary, indexes), sync it and rename it over ``path``; after a failed
        write, remove the temporary file instead. DataError if the file cannot be finished."""
        with self._lock:
            f = self._file
            if f is None:
                return
            self._file = None
            if self._failed:
                self._discard(f)
                log.warning("%s: not written (a write failed)", self.path)
                return
            try:
                self._writer.finish()
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(self._tmp, self.path)
            except BaseException as exc:  # Ctrl-C while finishing too: never leave the temporary file
                self._discard(f)
                if isinstance(exc, OSError):
                    raise DataError(f"{self.path}: cannot write: {exc.strerror or exc}") from exc
                raise
            log.info("%s: %d images, %d annotation messages", self.path, self.images, self.annotations)

    def discard(self) -> None:
        """Remove the temporary file, leaving ``path`` as it was."""
        with self._lock:
            self._discard()

    def _discard(self, f: IO[bytes] | None = None) -> None:
        """Close and remove the temporary file, whatever state it is in."""
        f = f or self._file
        self._file = None
        if f is not None:
            with contextlib.suppress(OSError):  # flushing what is discarded anyway
                f.close()
        self._tmp.unlink(missing_ok=True)
