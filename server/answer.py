"""One frame's journey from arrival to answer, and the answer itself (protobuf-free).

Both ``Detect`` and ``StreamDetect`` track each frame as a ``FrameTask``; ``finish_task``
turns a completed task into a ``FrameAnswer`` (post-processing the raw output when the frame
was inferred) and records the frame's metrics, so every answer is counted exactly once.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from perception.errors import InvalidInputError, ModelError, PerceptionError
from perception.pipeline import FramePipeline, Prepared
from perception.tracking import TrackResult
from perception.types import Detections, FrameStatus, StageTimings
from server.metrics_protocol import Metrics
from server.scheduler import JobResult, JobStatus
from server.trackers import TrackerUnavailable

log = logging.getLogger(__name__)
_FINISH_LOCK = threading.Lock()  # held for a check and a set only

# Metric drop reasons per non-OK status.
DROP_REASON = {FrameStatus.DROPPED_STALE: "stale", FrameStatus.EXPIRED: "expired", FrameStatus.INVALID: "invalid",
               FrameStatus.OVERLOADED: "overloaded"}
# A scheduler outcome that is not OK -> the answer status it becomes.
_JOB_ANSWER = {JobStatus.STALE: FrameStatus.DROPPED_STALE, JobStatus.EXPIRED: FrameStatus.EXPIRED,
               JobStatus.CANCELLED: FrameStatus.OVERLOADED, JobStatus.SHED: FrameStatus.OVERLOADED}


@dataclass(frozen=True)
class FrameAnswer:
    camera_id: str
    sequence: int
    capture_timestamp_ns: int
    status: FrameStatus
    message: str
    detections: Detections
    image_width: int
    image_height: int
    timings: StageTimings
    model_version: str = ""
    model_variant: str = ""
    class_names: tuple[str, ...] = ()  # of the model that answered (a hot swap may change them)
    tracks: Any = None  # perception.tracking.TrackResult when tracking was asked for
    # The server failed on the frame (inference or post-processing): a stream counts it INTERNAL,
    # as the error a unary call ends with is counted.
    internal_error: bool = False


@dataclass(eq=False)
class FrameTask:
    """A frame in flight. ``status`` is set for frames answered without inference."""

    camera_id: str
    sequence: int
    capture_timestamp_ns: int
    deadline_ms: int = 0
    size: int = 0  # the request's bytes on the wire (a stream counts what its unanswered frames hold)
    received: float = field(default_factory=time.monotonic)
    prepared: Prepared | None = None
    # The model the frame was prepared for: it post-processes the frame and names the answer.
    model: Any = None
    track: bool = False  # the request asked for track ids
    resent: bool | None = None  # the client sent it again after a reconnect (Frame.resent; None: not said)
    # Whose camera it is, for tracking: the client's host (a camera id is the client's own name,
    # so two vehicles may both call theirs "front"; a reconnect comes from the same host).
    owner: str = ""
    priority: int = 1  # the camera's priority class (server.config.PRIORITY_CLASSES)
    status: FrameStatus | None = None
    message: str = ""
    result: JobResult | None = None
    done: threading.Event = field(default_factory=threading.Event)
    on_change: Callable[[], None] | None = None
    # Bytes of model output the frame holds until it is answered (post-processed when its turn
    # comes): a stream counts them with its unanswered requests' bytes.
    output_bytes: int = 0

    def complete(self, result: JobResult) -> None:
        """Scheduler callback: the frame was inferred, dropped or expired."""
        if self.done.is_set():
            return
        self.result = result
        if result.outputs:
            self.output_bytes = sum(int(a.nbytes) for a in result.outputs.values())
        if self.prepared is not None:
            self.prepared.tensor = None  # inferred or dropped: only the placement is still needed
        self._finish()

    def answer_now(self, status: FrameStatus, message: str) -> None:
        """Answer without inference (invalid input, overload)."""
        if self.done.is_set():
            return
        self.status, self.message = status, message
        if self.prepared is not None:
            self.prepared.tensor = None
        self._finish()

    def _finish(self) -> None:
        with _FINISH_LOCK:  # once: a frame answered twice (a bug's error path) must not count twice
            if self.done.is_set():
                return
            self.done.set()
        if self.on_change is not None:
            self.on_change()


def finish_task(
    task: FrameTask, pipeline: FramePipeline, metrics: Metrics, answer_errors: bool = False, call_ended: bool = False
) -> FrameAnswer:
    """The answer of a done task; post-processes an inferred frame. Records metrics.

    If inference or post-processing failed, the frame is counted dropped ("error"), then:
    raises perception.errors.ModelError (a unary call ends INTERNAL), or with ``answer_errors``
    (a stream, which goes on) answers the frame OVERLOADED, marked ``internal_error``. A frame
    not answered because its call ended (``call_ended``) or the server cancelled its job (at
    shutdown) is counted dropped "cancelled", not "overloaded": the server was not busy.
    """
    result = task.result
    status, message = task.status, task.message
    finisher = task.model.pipeline if task.model is not None else pipeline
    detections = Detections.empty()
    post_s = 0.0
    failure = ""  # why the server failed on the frame; '' when it did not
    prep = task.prepared
    if status is None:
        if result is None:
            raise ModelError("a frame was finished before it was answered")
        if result.status is JobStatus.OK and prep is not None and result.outputs is not None:
            t0 = time.perf_counter()
            try:
                detections = finisher.finish(result.outputs, prep)
                status = FrameStatus.OK
            except Exception as exc:  # an output the model's layout cannot decode, or a bug
                error = f"error id {uuid.uuid4().hex[:12]}"
                log.error("post-processing %s/%d failed (%s)", task.camera_id, task.sequence, error,
                          exc_info=not isinstance(exc, PerceptionError))
                failure = f"post-processing failed ({error})"
                status, message = FrameStatus.OVERLOADED, f"{failure}; frame not processed"
            post_s = time.perf_counter() - t0
            result.outputs = None
        elif result.status is JobStatus.ERROR or result.status is JobStatus.OK:
            failure = result.message or "inference returned no output"
            # No FrameStatus says "internal error"; OVERLOADED tells the client to send the next
            # frame (this one was not processed), which is what it should do.
            status, message = FrameStatus.OVERLOADED, f"{result.message or 'inference failed'}; frame not processed"
        else:
            status, message = _JOB_ANSWER[result.status], result.message
    total_s = time.monotonic() - task.received
    if status is FrameStatus.OK and task.prepared is not None and _past_deadline(task, total_s):
        status, message, detections = FrameStatus.EXPIRED, "deadline passed during inference", Detections.empty()
    ok = status is FrameStatus.OK
    timings = StageTimings(
        queue_us=_us(result.queue_s if result else 0.0),
        preprocess_us=_us(prep.preprocess_s if prep else 0.0),
        inference_us=_us(result.inference_s if result and ok else 0.0),
        postprocess_us=_us(post_s),
        total_us=_us(total_s),
        batch_size=result.batch_size if result and ok else 0,
    )
    try:  # the answer goes out whatever its metrics do
        cancelled = call_ended or (result is not None and result.status is JobStatus.CANCELLED)
        reason = "error" if failure else "cancelled" if cancelled and status is not FrameStatus.OK else ""
        _record(metrics, task.camera_id, status, detections, finisher, timings, total_s, reason)
        stats = getattr(task.model, "stats", None)  # a ServedModel's: Triton's ModelStatistics
        if stats is not None and prep is not None:  # decoded for the model (server.model_stats)
            stats.answered(ok, total_s, result.queue_s if result else 0.0, prep.preprocess_s if prep else 0.0,
                           result.inference_s if result and ok else 0.0, post_s)
        if status is FrameStatus.OK:
            metrics.observe_priority(task.priority, total_s)
    except Exception:
        log.exception("recording the metrics of %s/%d failed", task.camera_id, task.sequence)
    if failure and not answer_errors:
        raise ModelError(failure)  # counted above: a unary call's failed frame is a dropped one too
    return FrameAnswer(
        camera_id=task.camera_id,
        sequence=task.sequence,
        capture_timestamp_ns=task.capture_timestamp_ns,
        status=status,
        message=message,
        detections=detections,
        image_width=prep.image_width if prep else 0,
        image_height=prep.image_height if prep else 0,
        timings=timings,
        model_version=task.model.version if task.model is not None else "",
        model_variant=task.model.variant.name if task.model is not None else "",
        class_names=finisher.classes,
        internal_error=bool(failure),
    )


def _past_deadline(task: FrameTask, total_s: float) -> bool:
    return bool(task.deadline_ms) and total_s * 1000.0 > task.deadline_ms


def _us(seconds: float) -> int:
    return max(0, int(round(seconds * 1e6)))


def _record(
    metrics: Metrics, camera: str, status: FrameStatus, det: Detections, pipeline: FramePipeline, t: StageTimings,
    total_s: float, reason: str = "",
) -> None:
    if status is FrameStatus.OK:
        metrics.frame_answered(camera)
        metrics.observe_stage("preprocess", t.preprocess_us / 1e6)
        metrics.observe_stage("postprocess", t.postprocess_us / 1e6)
        metrics.observe_stage("end_to_end", total_s)
        if len(det):
            ids, counts = _class_counts(det)
            for cid, n in zip(ids, counts, strict=True):
                metrics.detections_emitted(pipeline.classes[cid], n)
    else:
        metrics.frame_dropped(camera, reason or DROP_REASON[status])


def _class_counts(det: Detections) -> tuple[list[int], list[int]]:
    ids, counts = np.unique(det.class_ids, return_counts=True)
    return [int(i) for i in ids], [int(c) for c in counts]


class TrackSource(Protocol):
    """What tracks a frame's detections: ``server.trackers.Trackers`` (the server's, loaded on
    demand), or a ``perception.tracking.TrackerPool`` itself."""

    def update(self, camera_id: Hashable, detections: Detections, timestamp_ns: int, sequence: int | None = None, *,
               arrival_s: float | None = None, classes: tuple[str, ...] | None = None,
               resent: bool | None = None, frame_size: tuple[int, int] | None = None) -> TrackResult: ...


def track_answer(answer: FrameAnswer, task: FrameTask, trackers: TrackSource | None) -> FrameAnswer:
    """The answer with track ids from ``trackers`` (``server.trackers.Trackers``, keyed by
    the client's host and camera id, not by stream, so that a reconnecting stream finds its
    tracks) when the request asked for them.
    Runs after NMS, on the stream's handler path, in arrival order; frames answered without
    detections (stale, expired) are skipped, and the tracker predicts across the gap from the
    next frame's capture time."""
    if not task.track or trackers is None or answer.status is not FrameStatus.OK:
        return answer
    try:  # a capture time of 0 (none sent): the pool tracks the camera on the arrival clock
        result = trackers.update((task.owner, task.camera_id), answer.detections, task.capture_timestamp_ns,
                                 task.sequence, arrival_s=task.received, classes=answer.class_names,
                                 resent=task.resent, frame_size=(answer.image_width, answer.image_height))
    except (InvalidInputError, TrackerUnavailable) as exc:  # a non-finite box, no tracker: answered untracked
        return dataclasses.replace(answer, message=f"not tracked: {exc}")
    except Exception:  # a tracker bug costs this frame its tracks, never the stream and its other cameras
        error = f"error id {uuid.uuid4().hex[:12]}"
        log.exception("tracking camera %r frame %d failed (%s)", task.camera_id, task.sequence, error)
        return dataclasses.replace(answer, message=f"not tracked: the tracker failed ({error})")
    if result.late:
        return dataclasses.replace(answer, tracks=result,
                                   message="not tracked: it came after a later frame of its camera")
    return dataclasses.replace(answer, tracks=result)
