"""Client-side domain types: a frame read from a recording and the server's answer to it.

Protobuf stops at client/convert.py; everything else in the client works on these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from numpy.typing import NDArray

from perception.decode import PixelFormat
from perception.errors import DataError, InvalidInputError
from perception.pipeline import MAX_CAMERA_ID_LEN, SharedMemorySlot
from perception.tracking import TrackState
from perception.types import Detections, FrameStatus, StageTimings


@dataclass(frozen=True)
class RawPixels:
    """Uncompressed pixels as a driver hands them over.

    data: the bytes of the image, ``row_stride`` bytes per row (0 = tightly packed).
    """

    width: int
    height: int
    pixel_format: PixelFormat
    data: bytes
    row_stride: int = 0

    def __post_init__(self) -> None:
        if not all(0 <= v < 1 << 32 for v in (self.width, self.height, self.row_stride)):
            raise InvalidInputError(f"raw width, height and row stride must be in [0, 2^32), got {self.width}, "
                                    f"{self.height}, {self.row_stride}")


@dataclass(frozen=True)
class SourceFrame:
    """One camera frame as recorded.

    Exactly one of ``encoded`` (JPEG/PNG bytes, sent as-is), ``raw`` or ``shm`` (a slot of a
    shared-memory ring, for a server on the same host) is set.
    ``sequence`` is the index of the frame in its camera's recording (0-based, timestamp
    order; frames skipped by ``--skip`` keep their index). ``timestamp_ns`` is the capture
    time in nanoseconds. ``file_name`` is the frame's own file, relative to the recording (an
    image folder's), and "" for a frame that has none (a video's, an MCAP's, a bag's): a name
    made up from the position would be taken for a file and match ground truth by name, where
    ground truth numbered otherwise (from 1, say) names another frame.
    """

    camera_id: str
    sequence: int
    timestamp_ns: int
    encoded: bytes | None = None
    raw: RawPixels | None = None
    file_name: str = ""
    shm: SharedMemorySlot | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.encoded, self.raw, self.shm)) != 1:
            raise InvalidInputError("a SourceFrame carries exactly one of encoded bytes, raw pixels or a "
                                    "shared-memory slot")
        # What the wire cannot carry fails here, at the caller: found while a stream builds its
        # request, it cancelled the call, and the frame, re-sent first, ended every reconnect.
        try:
            self.camera_id.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(f"camera_id {self.camera_id!r} is not valid UTF-8 text (a file or folder name "
                                    "in another encoding?): rename it, or name a single camera with --camera") from None
        if len(self.camera_id) > MAX_CAMERA_ID_LEN:
            raise InvalidInputError(f"camera_id is longer than {MAX_CAMERA_ID_LEN} characters: "
                                    f"{self.camera_id[:40]!r}...; name the camera with --camera")
        if not 0 <= self.sequence < 1 << 64:
            raise InvalidInputError(f"sequence must be in [0, 2^64), got {self.sequence}")
        if not -(1 << 63) <= self.timestamp_ns < 1 << 63:
            raise InvalidInputError(f"timestamp_ns must fit a signed 64-bit integer, got {self.timestamp_ns}")

    @property
    def nbytes(self) -> int:
        """Bytes of image data carried in the request (a shared-memory slot's pixels are not)."""
        if self.encoded is not None:
            return len(self.encoded)
        if self.raw is not None:
            return len(self.raw.data)
        return 0


class DropReason(str, Enum):
    """Why a sent frame has no detection result: the keys of the summary's ``dropped`` counts.
    The string is what summary JSON files carry."""

    STALE = "stale"
    EXPIRED = "expired"
    INVALID = "invalid"
    OVERLOADED = "overloaded"
    LOST = "lost"  # never answered: the session gave up or was aborted (no server status)


def drop_reason(status: FrameStatus) -> DropReason:
    """The drop reason a summary counts a non-OK status under; ValueError for OK, which is not a drop."""
    if status is FrameStatus.OK:
        raise ValueError("an OK frame was not dropped")
    return _DROP_REASONS[status]


_DROP_REASONS = {
    FrameStatus.DROPPED_STALE: DropReason.STALE,
    FrameStatus.EXPIRED: DropReason.EXPIRED,
    FrameStatus.INVALID: DropReason.INVALID,
    FrameStatus.OVERLOADED: DropReason.OVERLOADED,
}


@dataclass(frozen=True)
class Tracks:
    """The server's track of each detection of one frame (``DetectOptions.track``), in the
    order of the detections.

    ids: (N,) int64, the track id of each detection; 0 = not tracked (below the tracker's low
        score, over its track limit, or a frame the server could not track).
    states: the state of each detection's track; None where it has none (id 0).
    """

    ids: NDArray[np.int64]
    states: tuple[TrackState | None, ...]

    def __post_init__(self) -> None:
        n = self.ids.shape[0] if self.ids.ndim == 1 else -1
        if n < 0 or len(self.states) != n:
            raise InvalidInputError(f"inconsistent tracks: ids {self.ids.shape}, {len(self.states)} states")
        if n and int(self.ids.min()) < 0:
            raise InvalidInputError("a track id is negative")

    @classmethod
    def untracked(cls, n: int) -> Tracks:
        """``n`` detections without a track."""
        return cls(np.zeros((n,), np.int64), (None,) * n)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class FrameResult:
    """The server's answer to one frame, plus the client-measured round trip.

    detections.boxes are in source-image pixels; ``class_names[i]`` names ``class_ids[i]``.
    ``tracks``: the track of each detection when tracking was asked for, else None (then the
    JSONL record carries no ``track_id`` / ``track_state``, as before tracking existed).
    """

    camera_id: str
    sequence: int
    capture_timestamp_ns: int
    status: FrameStatus
    message: str
    image_width: int
    image_height: int
    detections: Detections
    class_names: tuple[str, ...]
    timings: StageTimings
    latency_ms: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)
    tracks: Tracks | None = None
    model_version: str = ""  # which model answered (changes on a hot swap); "" if the server did not say
    model_variant: str = ""  # and its variant (changes when the server degrades)

    def __post_init__(self) -> None:
        if self.tracks is not None and len(self.tracks) != len(self.detections):
            raise InvalidInputError(
                f"{self.camera_id}/{self.sequence}: {len(self.tracks)} tracks for {len(self.detections)} detections"
            )

    def to_json_dict(self) -> dict[str, object]:
        """The JSONL record (shared interface: one object per answered frame). Each detection
        has ``track_id`` (0 = not tracked) and ``track_state`` (a TrackState name, or null)
        only when the frame has ``tracks``; ``model_version`` / ``model_variant`` only when the
        server named the model that answered."""
        dets: list[dict[str, object]] = [
            {
                "box": [round(float(v), 2) for v in box],
                "score": round(float(score), 5),
                "class_id": int(cid),
                "class_name": name,
            }
            for box, score, cid, name in zip(
                self.detections.boxes, self.detections.scores, self.detections.class_ids, self.class_names, strict=True
            )
        ]
        if self.tracks is not None:
            for det, tid, state in zip(dets, self.tracks.ids.tolist(), self.tracks.states, strict=True):
                det["track_id"] = int(tid)
                det["track_state"] = None if state is None else state.value
        return {
            "camera_id": self.camera_id,
            "sequence": self.sequence,
            "capture_timestamp_ns": self.capture_timestamp_ns,
            "status": self.status.value,
            "message": self.message,
            "image_width": self.image_width,
            "image_height": self.image_height,
            "detections": dets,
            "timings": self.timings.as_dict(),
            "latency_ms": round(self.latency_ms, 3),
            **({"model_version": self.model_version} if self.model_version else {}),
            **({"model_variant": self.model_variant} if self.model_variant else {}),
            **self.extra,
        }

    @classmethod
    def from_json_dict(cls, d: dict[str, object]) -> FrameResult:
        """Inverse of to_json_dict (for compare / evaluation of a saved replay). Raises
        DataError, KeyError, TypeError or ValueError on a malformed record."""
        dets = d.get("detections") or []
        if not isinstance(dets, list):
            raise DataError("'detections' must be a list")
        n = len(dets)
        boxes = np.array([x["box"] for x in dets], np.float32).reshape(n, 4)
        scores = np.array([x["score"] for x in dets], np.float32).reshape(n)
        ids = np.array([x["class_id"] for x in dets], np.int64).reshape(n)
        names = tuple(str(x.get("class_name", "")) for x in dets)
        tracks = None
        if any("track_id" in x or "track_state" in x for x in dets):
            try:
                tracks = Tracks(
                    np.array([_json_int(x.get("track_id", 0)) for x in dets], np.int64).reshape(n),
                    tuple(TrackState(x["track_state"]) if x.get("track_state") else None for x in dets),
                )
            except InvalidInputError as exc:
                raise DataError(str(exc)) from exc
        t = d.get("timings") or {}
        if not isinstance(t, dict):
            raise DataError("'timings' must be an object")
        known = {
            "camera_id", "sequence", "capture_timestamp_ns", "status", "message", "image_width",
            "image_height", "detections", "timings", "latency_ms", "model_version", "model_variant",
        }
        return cls(
            camera_id=str(d["camera_id"]),
            sequence=_json_int(d["sequence"]),
            capture_timestamp_ns=_json_int(d.get("capture_timestamp_ns", 0)),
            status=FrameStatus(str(d.get("status", "OK"))),
            message=str(d.get("message", "")),
            image_width=_json_int(d.get("image_width", 0)),
            image_height=_json_int(d.get("image_height", 0)),
            detections=Detections(boxes, scores, ids),
            class_names=names,
            timings=StageTimings(**{k: int(v) for k, v in t.items() if k in StageTimings.__dataclass_fields__}),
            latency_ms=_json_float(d.get("latency_ms", 0.0)),
            extra={k: v for k, v in d.items() if k not in known},
            tracks=tracks,
            model_version=str(d.get("model_version", "")),
            model_variant=str(d.get("model_variant", "")),
        )



def _json_int(value: object) -> int:
    """``int(value)`` of a JSON scalar; anything else raises TypeError, as ``int()`` would."""
    if not isinstance(value, (int, float, str)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return int(value)


def _json_float(value: object) -> float:
    """``float(value)`` of a JSON scalar; anything else raises TypeError, as ``float()`` would."""
    if not isinstance(value, (int, float, str)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)
