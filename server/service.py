"""The thin ``perception.v1.Detector`` servicer: protobuf in, domain calls, protobuf out.

Errors are raised as project exceptions and mapped to status codes by
``server.interceptors.ErrorInterceptor``; nothing here calls ``context.abort``.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from perception.errors import InvalidInputError, NotReadyError, OverloadedError
from perception.pipeline import MAX_CAMERA_ID_LEN, FrameInput, FramePipeline, Prepared, RequestOptions
from perception.types import FrameStatus
from perception.v1 import detector_pb2 as pb
from perception.v1 import detector_pb2_grpc as pb_grpc
from server import convert
from server.answer import FrameTask, TrackSource, finish_task, track_answer
from server.limits import ServiceLimits, StreamAdmission
from server.metrics_protocol import Metrics
from server.scheduler import Job, JobStatus, Scheduler
from server.shm import ShmReader, local_peer
from server.stream import StreamSession
from server.wire import Received, Refused, parse_detect_request, refuse_or, small_request_parser

log = logging.getLogger(__name__)
SERVICE_NAME = "perception.v1.Detector"
_unary_ids = itertools.count(1)


class DetectorService(pb_grpc.DetectorServicer):
    """Serves one loaded model. ``ready()`` / ``draining()`` come from the owning app."""

    def __init__(
        self,
        pipeline: FramePipeline,
        metrics: Metrics,
        outbox_size: int,
        cameras: frozenset[str],
        ready: Callable[[], bool],
        draining: Callable[[], bool],
        limits: ServiceLimits | None = None,
        max_class_filter: int = 0,
        trackers: TrackSource | None = None,
        shm: ShmReader | None = None,
    ) -> None:
        self._trackers = trackers
        self._shm = shm  # reads shared-memory frames; None = refused (the default)
        self._pipeline = pipeline
        self._limits = limits or ServiceLimits()
        # Repeated fields are capped before anything is built from them (class ids: the served
        # model's class count, looked up per request: a swapped-in model may have more classes).
        self._max_class_filter = max_class_filter
        self._scheduler: Scheduler | None = None
        self._models: Any = None
        self._model_info = pb.ModelInfo()
        self._metrics = metrics
        self._outbox_size = outbox_size
        self._cameras = cameras
        self._ready = ready
        self._draining = draining

    def attach(self, scheduler: Scheduler, model_info: pb.ModelInfo, models: Any = None) -> None:
        """Called once the model is loaded (and again after every swap); until then every call is
        answered UNAVAILABLE. ``models``: the ModelHost whose current model serves each new frame."""
        self._scheduler = scheduler
        self._model_info = model_info
        self._models = models

    def _current(self) -> tuple[FramePipeline, Any]:
        """The pipeline to prepare a new frame with, and the model it is prepared for."""
        if self._models is None:
            return self._pipeline, None
        model = self._models.current
        return model.pipeline, model

    def _check_serving(self) -> Scheduler:
        if self._draining():
            raise NotReadyError("server is shutting down; retry on another instance")
        if not self._ready() or self._scheduler is None:
            raise NotReadyError("model is still loading / warming up; retry shortly")
        return self._scheduler

    def admit_camera(self, camera_id: str) -> None:
        if self._cameras and camera_id not in self._cameras:
            raise InvalidInputError(
                f"camera {camera_id!r} is not in the server's camera allow-list {sorted(self._cameras)}"
            )

    def _convert(
        self, request: pb.DetectRequest | Refused | Received, local: bool
    ) -> tuple[FrameInput, RequestOptions]:
        """``local``: the call's client is on this host (``server.shm.local_peer``)."""
        if isinstance(request, pb.DetectRequest) and request.frame.WhichOneof("image") == "shm":
            # Before the server reads anything from its host's memory on a client's word.
            if not local:
                raise InvalidInputError("shared-memory frames are taken only from a client on the server's host, "
                                        "connected over loopback or a unix socket")
            self.admit_camera(request.frame.camera_id)
        cap = self._max_class_filter or len(self._current()[0].classes)
        return convert.frame_from_proto(request, cap, self._shm)

    def Detect(
        self, request: pb.DetectRequest | Refused | Received, context: grpc.ServicerContext
    ) -> pb.DetectResponse:
        scheduler = self._check_serving()
        # Unary calls share the handler pool with health checks: at most max_unary_detect_calls
        # at once, the next refused RESOURCE_EXHAUSTED here, before it holds anything.
        with self._limits.unary_detect.hold():
            return self._detect(scheduler, request, context)

    def _detect(
        self, scheduler: Scheduler, request: pb.DetectRequest | Refused | Received, context: grpc.ServicerContext
    ) -> pb.DetectResponse:
        camera_id, sequence, ts, deadline_ms = convert.identify(request)
        if len(camera_id) > MAX_CAMERA_ID_LEN:  # before the id is counted (a metric label)
            raise InvalidInputError(f"camera_id is longer than {MAX_CAMERA_ID_LEN} characters")
        task = FrameTask(camera_id, sequence, ts, deadline_ms=deadline_ms)
        # From here on every way out counts the frame answered or dropped, once, with the reason
        # a stream's frame would be dropped for.
        self._metrics.frame_received(camera_id)
        try:  # over capacity: refused before its decode, not after
            scheduler.check_room(priority=self._limits.priority_of(camera_id))
        except OverloadedError as exc:
            self._drop(task, FrameStatus.OVERLOADED, str(exc))
            raise
        size = request.ByteSize()
        if not self._limits.undecoded.try_take(size):
            self._drop(task, FrameStatus.OVERLOADED, "undecoded-bytes budget full")
            raise OverloadedError(f"{self._limits.undecoded.name} is full ({size} bytes do not fit); retry later")
        try:
            task.prepared = self._prepare(task, request, context.peer())
        except Exception as exc:  # bad input; or an internal error, answered INVALID on a stream
            self._drop(task, FrameStatus.INVALID, str(exc))
            raise
        finally:
            if isinstance(request, Received):
                request.release()  # the bytes go when the budget stops counting them, not at the answer
            self._limits.undecoded.give_back(size)
        key = ("unary", next(_unary_ids))
        deadline = task.received + deadline_ms / 1000.0 if deadline_ms else None
        job = Job(key=key, tensor=task.prepared.tensor, on_done=task.complete, deadline=deadline, model=task.model,
                  priority=self._limits.priority_of(camera_id))
        try:
            if not scheduler.run_if_idle(job, transient=True):  # an idle engine runs it on this thread, no hand-offs
                scheduler.submit(job, transient=True)
        except Exception as exc:  # over capacity or shutting down (or a bug): OVERLOADED on a stream
            self._drop(task, FrameStatus.OVERLOADED, str(exc))
            raise
        while not task.done.wait(0.25):
            if not context.is_active():  # the client cancelled or its deadline passed
                scheduler.close(key)  # answers the frame CANCELLED, unless a batch has it
                self._drop(task, FrameStatus.OVERLOADED, "the call ended before the frame was answered",
                           call_ended=True)
                return pb.DetectResponse()
        # Counts the frame; if its inference or post-processing failed, raises ModelError after.
        answer = finish_task(task, self._pipeline, self._metrics)
        if task.result is not None and task.result.status is JobStatus.CANCELLED:
            raise NotReadyError("server is shutting down; retry on another instance")
        return convert.answer_to_proto(track_answer(answer, task, self._trackers))

    def _prepare(self, task: FrameTask, request: pb.DetectRequest | Refused | Received, peer: str) -> Prepared:
        """The frame converted, checked and prepared, all in a decode slot. Converting copies a
        shared-memory frame out of its slot (the undecoded-bytes budget saw only its ~100-byte
        request): in the slot, the server holds one such copy per slot however many calls wait,
        and none once the frame is prepared (the copy is this method's own)."""
        task.owner = StreamAdmission.host_of(peer)
        # The decode slots' fairness is by client host: a new connection (a new port) per call
        # would otherwise start with no decode time used every time.
        with self._limits.decode.slot(("unary", task.owner)):
            frame, opts = self._convert(request, local_peer(peer))
            self.admit_camera(frame.camera_id)
            task.track, task.resent = opts.track, frame.resent
            task.priority = self._limits.priority_of(task.camera_id)
            # The model is taken once the slot is ours: a wait for it can outlast a swap, and the
            # model swapped out is freed a few seconds after.
            pipeline, task.model = self._current()
            return pipeline.prepare(frame, opts)

    def _drop(self, task: FrameTask, status: FrameStatus, message: str, call_ended: bool = False) -> None:
        """Answer a frame ``status`` unless it was answered already (then as it was), and count it.
        The call then ends its own way, so a frame whose inference failed meanwhile raises nothing."""
        task.answer_now(status, message)
        finish_task(task, self._pipeline, self._metrics, answer_errors=True, call_ended=call_ended)

    def StreamDetect(
        self, request_iterator: Iterable[pb.DetectRequest | Refused | Received], context: grpc.ServicerContext
    ) -> Iterator[pb.DetectResponse]:
        scheduler = self._check_serving()
        session = StreamSession(
            self._pipeline,
            scheduler,
            functools.partial(self._convert, local=local_peer(context.peer())),
            convert.identify,
            self._metrics,
            self._outbox_size,
            self.admit_camera,
            self._draining,
            self._limits,
            current_model=self._current,
            trackers=self._trackers,
            cancel_call=context.cancel,
            owner=StreamAdmission.host_of(context.peer()),
        )
        metrics = self._metrics

        def ended() -> None:
            session.cancel()
            metrics.stream_closed()

        if not self._limits.streams.hold(context, metrics.stream_opened, ended):  # the call already ended
            return
        for answer in session.answers(request_iterator):
            yield convert.answer_to_proto(answer)

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        self._check_serving()
        return self._model_info


def add_detector_service(service: DetectorService, server: grpc.Server) -> None:
    """Register ``service`` as perception.v1.Detector, as the generated
    ``add_DetectorServicer_to_server`` does, except that Detect and StreamDetect requests go
    through server.wire's look at the wire bytes before protobuf parses them."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Detect": grpc.unary_unary_rpc_method_handler(
            service.Detect, request_deserializer=parse_detect_request,
            response_serializer=pb.DetectResponse.SerializeToString),
        "StreamDetect": grpc.stream_stream_rpc_method_handler(
            service.StreamDetect, request_deserializer=parse_detect_request,
            response_serializer=pb.DetectResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            refuse_or(service.GetModelInfo), request_deserializer=small_request_parser(pb.GetModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    register = getattr(server, "add_registered_method_handlers", None)  # grpcio >= 1.63: no generic lookup per call
    if register is not None:
        register(SERVICE_NAME, handlers)
