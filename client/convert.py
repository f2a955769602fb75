"""The protobuf boundary: SourceFrame -> DetectRequest, DetectResponse -> FrameResult.

Nothing else in client/ touches perception.v1 messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import numpy as np

from client.frames import FrameResult, FrameStatus, SourceFrame, Tracks
from perception.errors import ConfigError
from perception.pipeline import SharedMemorySlot
from perception.tracking import TrackState
from perception.types import Detections, StageTimings
from perception.v1 import detector_pb2 as pb


@dataclass(frozen=True)
class RequestOptions:
    """Per-request post-processing options; zero / empty values mean the model's defaults.
    ``track``: ask the server for a track id per detection (its tracker per camera)."""

    score_threshold: float = 0.0
    iou_threshold: float = 0.0
    max_detections: int = 0
    class_filter: tuple[int, ...] = field(default_factory=tuple)
    class_agnostic_nms: bool = False
    track: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold <= 1.0 or not 0.0 <= self.iou_threshold <= 1.0:
            raise ConfigError("score_threshold and iou_threshold must be in [0, 1]")
        if self.max_detections < 0 or any(c < 0 for c in self.class_filter):
            raise ConfigError("max_detections and class ids must not be negative")


def to_request(frame: SourceFrame, options: RequestOptions | None = None, deadline_ms: int = 0,
               resent: bool = False) -> pb.DetectRequest:
    """Build the wire request. Encoded bytes go as-is; raw pixels as a RawImage. ``resent``:
    the frame goes again on a new connection, unanswered on the last one (``Frame.resent``)."""
    msg = pb.Frame(
        camera_id=frame.camera_id,
        sequence=frame.sequence,
        capture_timestamp_ns=frame.timestamp_ns,
        deadline_ms=max(0, int(deadline_ms)),
        resent=resent,
    )
    # The generated stub types enum fields as pb.PixelFormat, which is no callable class at
    # runtime (an EnumTypeWrapper); the wire value is the plain int.
    if frame.encoded is not None:
        msg.encoded = frame.encoded
    elif frame.shm is not None:
        msg.shm.CopyFrom(shm_ref(frame.shm))
    else:
        raw = frame.raw
        assert raw is not None
        wire_format = cast(pb.PixelFormat, int(raw.pixel_format))
        msg.raw.CopyFrom(
            pb.RawImage(
                width=raw.width, height=raw.height, row_stride=raw.row_stride, format=wire_format, data=raw.data
            )
        )
    req = pb.DetectRequest(frame=msg)
    if options is not None:
        req.options.CopyFrom(
            pb.DetectOptions(
                score_threshold=options.score_threshold,
                iou_threshold=options.iou_threshold,
                max_detections=options.max_detections,
                class_filter=list(options.class_filter),
                class_agnostic_nms=options.class_agnostic_nms,
                track=options.track,
            )
        )
    return req


def shm_ref(slot: SharedMemorySlot) -> pb.SharedMemoryRef:
    """The wire form of a shared-memory slot reference."""
    return pb.SharedMemoryRef(
        segment=slot.segment, offset=slot.offset, byte_size=slot.byte_size, generation=slot.generation,
        width=slot.width, height=slot.height, row_stride=slot.row_stride,
        format=cast(pb.PixelFormat, int(slot.pixel_format)),
    )


_STATUS = {
    pb.FRAME_STATUS_OK: FrameStatus.OK,
    pb.FRAME_STATUS_DROPPED_STALE: FrameStatus.DROPPED_STALE,
    pb.FRAME_STATUS_EXPIRED: FrameStatus.EXPIRED,
    pb.FRAME_STATUS_INVALID: FrameStatus.INVALID,
    pb.FRAME_STATUS_OVERLOADED: FrameStatus.OVERLOADED,
}


_TRACK_STATE = {
    pb.TRACK_STATE_NEW: TrackState.NEW,
    pb.TRACK_STATE_CONFIRMED: TrackState.CONFIRMED,
    pb.TRACK_STATE_COASTING: TrackState.COASTING,
}


def from_response(resp: pb.DetectResponse, latency_ms: float = 0.0) -> FrameResult:
    """Convert a response; an unspecified status (an old or broken server) reads as INVALID.

    ``tracks`` is set when a detection carries a track id or state; a response without any
    (tracking not asked for, or nothing tracked in this frame) has None: the caller that asked
    for tracking knows which (``client.replay``). An unknown track state reads as None."""
    n = len(resp.detections)
    boxes = np.empty((n, 4), np.float32)
    scores = np.empty((n,), np.float32)
    ids = np.empty((n,), np.int64)
    track_ids = np.empty((n,), np.int64)
    states: list[TrackState | None] = []
    names = []
    for i, d in enumerate(resp.detections):
        boxes[i] = (d.box.x1, d.box.y1, d.box.x2, d.box.y2)
        scores[i] = d.score
        ids[i] = d.class_id
        names.append(d.class_name)
        track_ids[i] = d.track_id
        states.append(_TRACK_STATE.get(d.track_state))
    tracked = bool(track_ids.any()) or any(s is not None for s in states)
    status = _STATUS.get(resp.status, FrameStatus.INVALID)
    message = resp.message
    if resp.status not in _STATUS:
        message = message or f"server sent unknown status {resp.status}"
    t = resp.timings
    return FrameResult(
        camera_id=resp.camera_id,
        sequence=int(resp.sequence),
        capture_timestamp_ns=int(resp.capture_timestamp_ns),
        status=status,
        message=message,
        image_width=int(resp.image_width),
        image_height=int(resp.image_height),
        detections=Detections(boxes, scores, ids),
        class_names=tuple(names),
        timings=StageTimings(
            queue_us=int(t.queue_us),
            preprocess_us=int(t.preprocess_us),
            inference_us=int(t.inference_us),
            postprocess_us=int(t.postprocess_us),
            total_us=int(t.total_us),
            batch_size=int(t.batch_size),
        ),
        latency_ms=latency_ms,
        tracks=Tracks(track_ids, tuple(states)) if tracked else None,
        model_version=resp.model_version,
        model_variant=resp.model_variant,
    )
