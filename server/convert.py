"""Protobuf <-> domain conversion at the servicer boundary; nothing inside sees protobuf."""

from __future__ import annotations

import json
import math

from perception.decode import ImageBytes
from perception.errors import InvalidInputError
from perception.manifest import Manifest, Variant
from perception.pipeline import FrameInput, RawPixels, RequestOptions, SharedMemorySlot
from perception.tracking import TrackState
from perception.types import FrameStatus
from perception.v1 import detector_pb2 as pb
from server.answer import FrameAnswer
from server.shm import ShmReader
from server.wire import Received, Refused

_STATUS = {
    FrameStatus.OK: pb.FRAME_STATUS_OK,
    FrameStatus.DROPPED_STALE: pb.FRAME_STATUS_DROPPED_STALE,
    FrameStatus.EXPIRED: pb.FRAME_STATUS_EXPIRED,
    FrameStatus.INVALID: pb.FRAME_STATUS_INVALID,
    FrameStatus.OVERLOADED: pb.FRAME_STATUS_OVERLOADED,
}


_TRACK_STATE = {
    None: pb.TRACK_STATE_UNSPECIFIED,
    TrackState.NEW: pb.TRACK_STATE_NEW,
    TrackState.CONFIRMED: pb.TRACK_STATE_CONFIRMED,
    TrackState.COASTING: pb.TRACK_STATE_COASTING,
}


def frame_from_proto(
    request: pb.DetectRequest | Refused | Received, max_class_filter: int = 1024, shm: ShmReader | None = None
) -> tuple[FrameInput, RequestOptions]:
    """The frame and options of a request. Raises InvalidInputError for a request the wire check
    refused (server.wire), a frame with no image, or more class-filter entries than
    ``max_class_filter`` (checked before any is converted). A shared-memory frame is read here
    (copied out of its slot) by ``shm``; without one (the server's default) it is refused."""
    if isinstance(request, Refused):
        raise InvalidInputError(request.reason)
    received = request if isinstance(request, Received) else None  # image kept out of protobuf (server.wire)
    req = request.request if isinstance(request, Received) else request
    f = req.frame
    if len(req.options.class_filter) > max_class_filter:
        raise InvalidInputError(
            f"class_filter has {len(req.options.class_filter)} entries; at most {max_class_filter} (one per class)"
        )
    kind = f.WhichOneof("image") if received is None else received.kind
    encoded: ImageBytes | None = None
    raw = None
    if kind == "encoded":
        encoded = f.encoded if received is None else received.payload
    elif kind == "raw":
        r = f.raw
        raw = RawPixels(int(r.width), int(r.height), int(r.row_stride), int(r.format),
                        r.data if received is None else received.payload)
    elif kind == "shm":
        if shm is None:
            raise InvalidInputError("shared-memory frames are off on this server (it maps them only when started "
                                    "with --shm-allow PREFIX, for a client on the same host)")
        m = f.shm
        raw = shm.read(SharedMemorySlot(m.segment, int(m.offset), int(m.byte_size), int(m.generation), int(m.width),
                               int(m.height), int(m.row_stride), int(m.format)))
    frame = FrameInput(
        camera_id=f.camera_id,
        sequence=int(f.sequence),
        capture_timestamp_ns=int(f.capture_timestamp_ns),
        encoded=encoded,
        raw=raw,
        deadline_ms=int(f.deadline_ms),
        resent=f.resent if f.HasField("resent") else None,  # None: a client older than the field
    )
    if kind is None:
        # Checked here, with the oneof at hand; the pipeline re-checks for in-process callers.
        frame = FrameInput(frame.camera_id, frame.sequence, frame.capture_timestamp_ns, deadline_ms=frame.deadline_ms)
    o = req.options
    opts = RequestOptions(
        score_threshold=_finite("score_threshold", o.score_threshold),
        iou_threshold=_finite("iou_threshold", o.iou_threshold),
        max_detections=int(o.max_detections),
        class_filter=tuple(int(c) for c in o.class_filter),
        class_agnostic=bool(o.class_agnostic_nms),
        track=bool(o.track),
    )
    return frame, opts


def identify(request: pb.DetectRequest | Refused | Received) -> tuple[str, int, int, int]:
    """(camera_id, sequence, capture_timestamp_ns, deadline_ms) of a request, for echoing."""
    f = request.frame if isinstance(request, pb.DetectRequest) else request.request.frame
    return f.camera_id, int(f.sequence), int(f.capture_timestamp_ns), int(f.deadline_ms)


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {value}")
    return float(value)


def answer_to_proto(answer: FrameAnswer) -> pb.DetectResponse:
    d = answer.detections
    t = answer.timings
    resp = pb.DetectResponse(
        camera_id=answer.camera_id,
        sequence=answer.sequence,
        capture_timestamp_ns=answer.capture_timestamp_ns,
        status=_STATUS[answer.status],
        message=answer.message,
        image_width=answer.image_width,
        image_height=answer.image_height,
        model_version=answer.model_version,
        model_variant=answer.model_variant,
        timings=pb.StageTimings(
            queue_us=t.queue_us,
            preprocess_us=t.preprocess_us,
            inference_us=t.inference_us,
            postprocess_us=t.postprocess_us,
            total_us=t.total_us,
            batch_size=t.batch_size,
        ),
    )
    if len(d):
        boxes = d.boxes.tolist()
        scores = d.scores.tolist()
        ids = d.class_ids.tolist()
        tracks = answer.tracks
        track_ids = tracks.track_ids.tolist() if tracks is not None else [0] * len(ids)
        states = tracks.states if tracks is not None else (None,) * len(ids)
        resp.detections.extend(
            pb.Detection(
                box=pb.Box(x1=b[0], y1=b[1], x2=b[2], y2=b[3]), score=s, class_id=c, class_name=answer.class_names[c],
                track_id=t, track_state=_TRACK_STATE[st],
            )
            for b, s, c, t, st in zip(boxes, scores, ids, track_ids, states, strict=True)
        )
    return resp


def status_only(camera_id: str, sequence: int, ts: int, status: FrameStatus, message: str) -> pb.DetectResponse:
    return pb.DetectResponse(
        camera_id=camera_id, sequence=sequence, capture_timestamp_ns=ts, status=_STATUS[status], message=message
    )


def model_info(manifest: Manifest, variant: Variant, backend: str, max_batch: int,
               max_message_bytes: int = 0) -> pb.ModelInfo:
    kpi = {**variant.metrics}
    return pb.ModelInfo(
        name=manifest.name,
        version=manifest.version,
        classes=list(manifest.classes),
        input_width=manifest.preprocess.input_width,
        input_height=manifest.preprocess.input_height,
        precision=variant.precision.value,
        backend=backend,
        macs=int(variant.macs),
        params=int(variant.params),
        kpi=[pb.Metric(name=k, value=float(v)) for k, v in sorted(kpi.items()) if _is_number(v)],
        variant=variant.name,
        max_batch=max_batch,
        manifest_json=json.dumps(manifest.to_dict(), default=str),
        max_message_bytes=max_message_bytes,
    )


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
