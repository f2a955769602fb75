"""The KServe v2 / Open Inference Protocol front door: ``inference.GRPCInferenceService``.

Stock clients (tritonclient, the KServe SDK) see the served detector as one model:

- input ``IMAGE``: BYTES ``[B]`` (or ``[B, 1]``), each element one encoded JPEG/PNG frame; or
  UINT8 ``[H, W, 3]`` / ``[B, H, W, 3]``, raw BGR pixels (HWC, tightly packed).
- output ``DETECTIONS``: FP32 ``[N, 6]``, rows ``x1, y1, x2, y2, score, class_id`` in source
  pixels; the rows of frame 0 first, then those of frame 1, and so on.
- output ``NUM_DETECTIONS``: INT32 ``[B]``, the rows of ``DETECTIONS`` that belong to each frame.
- request parameters: ``score_threshold``, ``iou_threshold`` (numbers), ``max_detections`` (int),
  ``class_filter`` (ids as a string, "0,2"), ``class_agnostic_nms`` (bool), ``camera_id`` (one
  id, or one per frame comma-separated: the metric label and allow-list key, like the native
  ``Frame.camera_id``), ``timeout`` (microseconds, as Triton's). Unknown parameters are refused;
  of Triton's reserved ``triton_*`` ones, ``triton_enable_empty_final_response`` (bool) is taken,
  as Triton takes it: perf_analyzer sends it on every request, and a stream's answers to a request
  that sets it carry ``triton_final_response: true`` (each request has one answer, its last).

Each frame of a request goes through ``FramePipeline.prepare`` and its own scheduler queue, like
a frame of its own camera: the B frames are batched with each other and with every other
caller's frames, and each frame is counted in the metrics exactly as a native ``Detect`` frame.
Errors are project exceptions, mapped to status codes by ``server.interceptors.ErrorInterceptor``
(registered for the ``/inference.`` prefix). Raw tensor contents (``raw_input_contents`` /
``raw_output_contents``, little-endian; BYTES elements each prefixed by their 4-byte length) are
what tritonclient sends and expects; typed ``contents`` are accepted too.

The vendored proto (proto/kserve) is compiled to messages only: the handlers are registered
here. Of Triton's RPCs beyond KServe, ModelConfig is answered (proto/kserve/model_config.proto:
the subset of Triton's messages that describes this detector), ModelStatistics with the served
model's running sums (``server.model_stats``), and ModelStreamInfer serves a
stream of ModelInfer requests, answered in order, up to ``STREAM_WINDOW`` of them in the server
at once (``server.kserve_stream``). Bytes that are no request of the method's type are
INVALID_ARGUMENT, never INTERNAL. As Triton does, an unknown model or version is NOT_FOUND and a
frame past its deadline DEADLINE_EXCEEDED. Client strings quoted in errors are cut to 64
characters, and each client's decodes are its own in the decode slots' fairness. Reading a
request's tensors and parameters, and writing its answer, is ``server.kserve_tensors``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

import perception
from perception.errors import InvalidInputError, ModelError, NotReadyError, OverloadedError
from perception.pipeline import FramePipeline, RequestOptions
from perception.types import FrameStatus
from perception.v1 import grpc_predict_v2_pb2 as kpb
from perception.v1 import model_config_pb2 as mcpb
from server.answer import FrameAnswer, FrameTask, finish_task
from server.errors import DeadlineError, NotFoundError
from server.kserve_stream import SHUTTING_DOWN, InferStream, Started
from server.kserve_tensors import (
    INPUT,
    OUTPUTS,
    Datatype,
    RequestFrames,
    deadline_ms,
    frame_cameras,
    infer_response,
    parse_parameters,
    request_frames,
    requested_outputs,
    shown,
)
from server.limits import ServiceLimits, StreamAdmission
from server.metrics_protocol import Metrics
from server.model_stats import Duration
from server.scheduler import Job, JobStatus, Scheduler
from server.served_model import ServedModel
from server.wire import RefusedInfer, parse_model_infer_request, refuse_or, small_request_parser

log = logging.getLogger(__name__)
_ids = itertools.count(1)

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "perception"
# Triton's names for the extensions served (ServerMetadata): its ModelConfig and request
# parameters. ModelStatistics is served but not listed as "statistics": perf_analyzer asks for it
# only when listed, then reads model versions as integers (Triton's), and this server's are the
# manifest's ("0.1.0+70af047c..."), so it stopped with "missing statistics for requested model"
# instead of measuring. tritonclient's get_inference_statistics does not look at the list.
EXTENSIONS = ["model_configuration", "parameters"]
STREAM_WINDOW = 4  # requests of one ModelStreamInfer stream in the server at once (decoded, queued or inferred)


class KServeService:
    """Serves the loaded model over KServe v2 gRPC. ``ready()`` / ``draining()`` come from the app.

    The KServe model is the served one: its manifest's name and version, its backend as the
    platform, its batch as the most frames one request may carry. After a hot swap, requests
    are served by (and named after) the new model.
    """

    def __init__(
        self,
        metrics: Metrics,
        cameras: frozenset[str],
        ready: Callable[[], bool],
        draining: Callable[[], bool],
        limits: ServiceLimits | None = None,
        max_class_filter: int = 0,
    ) -> None:
        self._metrics = metrics
        self._cameras = cameras
        self._ready = ready
        self._draining = draining
        self._limits = limits or ServiceLimits()
        self._max_class_filter = max_class_filter  # 0 = the model's class count
        self._scheduler: Scheduler | None = None
        self._current: Callable[[], ServedModel] | None = None

    def attach(self, scheduler: Scheduler, current: Callable[[], ServedModel]) -> None:
        """Called once the model is loaded; until then inference is answered UNAVAILABLE.
        ``current()``: the model a new request is served by (``ModelHost.current``)."""
        self._scheduler = scheduler
        self._current = current

    def add_to_server(self, server: grpc.Server) -> None:
        """Register every method of ``inference.GRPCInferenceService`` on ``server``."""

        def unary(behavior: Callable[[Any, grpc.ServicerContext], Any], request: Any, response: Any) -> Any:
            # A deserializer that raised (a name that is not UTF-8, truncated bytes) ended the
            # call INTERNAL, "Exception deserializing request!", before any handler or the error
            # interceptor ran: a client error reported as the server's, and not counted. And
            # these requests are small: a big one is refused unparsed (server.wire).
            return grpc.unary_unary_rpc_method_handler(
                refuse_or(behavior), request_deserializer=small_request_parser(request),
                response_serializer=response.SerializeToString
            )

        handlers = {
            "ServerLive": unary(self.ServerLive, kpb.ServerLiveRequest, kpb.ServerLiveResponse),
            "ServerReady": unary(self.ServerReady, kpb.ServerReadyRequest, kpb.ServerReadyResponse),
            "ModelReady": unary(self.ModelReady, kpb.ModelReadyRequest, kpb.ModelReadyResponse),
            "ServerMetadata": unary(self.ServerMetadata, kpb.ServerMetadataRequest, kpb.ServerMetadataResponse),
            "ModelMetadata": unary(self.ModelMetadata, kpb.ModelMetadataRequest, kpb.ModelMetadataResponse),
            # Looked at on the wire before protobuf parses it (server.wire): field floods and huge
            # typed contents would hold the GIL for tens of ms while parsed.
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                self.ModelInfer, request_deserializer=parse_model_infer_request,
                response_serializer=kpb.ModelInferResponse.SerializeToString),
            # Triton's extension beyond the KServe protocol, which stock Triton clients and
            # perf_analyzer ask for: the subset of its ModelConfig that describes this detector.
            "ModelConfig": unary(self.ModelConfig, mcpb.ModelConfigRequest, mcpb.ModelConfigResponse),
            # ... its statistics, which perf_analyzer reads for the server's side of a measurement ...
            "ModelStatistics": unary(self.ModelStatistics, mcpb.ModelStatisticsRequest, mcpb.ModelStatisticsResponse),
            # ... and its streaming one, which Triton's clients use for a camera's frames.
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.ModelStreamInfer, request_deserializer=parse_model_infer_request,
                response_serializer=mcpb.ModelStreamInferResponse.SerializeToString),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))

    # -- health and metadata -------------------------------------------------------------------

    def _serving(self) -> ServedModel | None:
        """The served model, or None while loading or draining."""
        if not self._ready() or self._draining() or self._current is None:
            return None
        return self._current()

    def _check_ready(self) -> tuple[Scheduler, Callable[[], ServedModel]]:
        """NotReadyError while loading or draining."""
        if self._draining():
            raise NotReadyError(SHUTTING_DOWN)
        if not self._ready() or self._scheduler is None or self._current is None:
            raise NotReadyError("model is still loading / warming up; retry shortly")
        return self._scheduler, self._current

    def _check_serving(self, name: str, version: str) -> tuple[Scheduler, ServedModel]:
        """The scheduler and the model named ``name`` (``version``: "" = the served one)."""
        scheduler, current = self._check_ready()
        model = current()
        if not _names(model, name, version):
            asked = shown(name) + (f" version {shown(version)}" if version else "")
            raise NotFoundError(f"unknown model {asked}; this server serves {model.manifest.name!r} "
                                f"version {model.version!r}")
        return scheduler, model

    def ServerLive(self, request: kpb.ServerLiveRequest, context: grpc.ServicerContext) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    def ServerReady(self, request: kpb.ServerReadyRequest, context: grpc.ServicerContext) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self._serving() is not None)

    def ModelReady(self, request: kpb.ModelReadyRequest, context: grpc.ServicerContext) -> kpb.ModelReadyResponse:
        model = self._serving()
        return kpb.ModelReadyResponse(ready=model is not None and _names(model, request.name, request.version))

    def ServerMetadata(
        self, request: kpb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=perception.__version__, extensions=EXTENSIONS)

    def ModelMetadata(
        self, request: kpb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> kpb.ModelMetadataResponse:
        _, model = self._check_serving(request.name, request.version)
        tensor = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=model.manifest.name,
            versions=[model.version],
            platform=model.backend.name,
            inputs=[tensor(name=INPUT, datatype=Datatype.BYTES.value, shape=[-1])],
            outputs=[tensor(name=name, datatype=dtype.value, shape=shape) for name, (dtype, shape) in OUTPUTS.items()],
        )

    def ModelConfig(self, request: mcpb.ModelConfigRequest, context: grpc.ServicerContext) -> mcpb.ModelConfigResponse:
        """Triton's ModelConfig of the served detector: no implicit batch dimension
        (max_batch_size 0: a request's frames are IMAGE's first dimension, and DETECTIONS holds
        every frame's rows one after the other, NUM_DETECTIONS how many each), the same tensors
        as ModelMetadata."""
        _, model = self._check_serving(request.name, request.version)
        string, fp32, int32 = mcpb.DataType.TYPE_STRING, mcpb.DataType.TYPE_FP32, mcpb.DataType.TYPE_INT32
        types = {Datatype.FP32: fp32, Datatype.INT32: int32}
        return mcpb.ModelConfigResponse(config=mcpb.ModelConfig(
            name=model.manifest.name,
            platform=model.backend.name,
            backend="perception",
            max_batch_size=0,
            input=[mcpb.ModelInput(name=INPUT, data_type=string, dims=[-1])],
            output=[mcpb.ModelOutput(name=name, data_type=types[dtype], dims=shape)
                    for name, (dtype, shape) in OUTPUTS.items()],
        ))

    def ModelStatistics(self, request: mcpb.ModelStatisticsRequest,
                        context: grpc.ServicerContext) -> mcpb.ModelStatisticsResponse:
        """Triton's cumulative statistics of the served model's version (``server.model_stats``).
        An empty name asks for every model: the one served. Triton answers an unknown model
        NOT_FOUND."""
        _, current = self._check_ready()
        model = current()
        if (request.name or request.version) and not _names(model, request.name, request.version):
            _, model = self._check_serving(request.name, request.version)  # raises NotFoundError
        s = model.stats.snapshot()

        def d(x: Duration) -> mcpb.StatisticDuration:
            return mcpb.StatisticDuration(count=x.count, ns=x.ns)

        return mcpb.ModelStatisticsResponse(model_stats=[mcpb.ModelStatistics(
            name=model.manifest.name, version=model.version, last_inference=s.last_inference_ms,
            inference_count=s.inference_count, execution_count=s.execution_count,
            inference_stats=mcpb.InferStatistics(
                success=d(s.success), fail=d(s.fail), queue=d(s.queue), compute_input=d(s.compute_input),
                compute_infer=d(s.compute_infer), compute_output=d(s.compute_output)),
            batch_stats=[mcpb.InferBatchStatistics(batch_size=size, compute_infer=d(runs))
                         for size, runs in sorted(s.batches.items())],
        )])

    # -- inference -----------------------------------------------------------------------------

    def ModelInfer(self, request: kpb.ModelInferRequest | RefusedInfer,
                   context: grpc.ServicerContext) -> kpb.ModelInferResponse:
        # The unary Detect cap covers these too: they share the handler pool with health checks.
        with self._limits.unary_detect.hold(stream="ModelStreamInfer"):
            owner = ("kserve", StreamAdmission.host_of(context.peer()))
            started = self._start(request, context.time_remaining(), owner)
            return self._finish(started, context.is_active) or kpb.ModelInferResponse()

    def ModelStreamInfer(self, requests: Iterator[kpb.ModelInferRequest | RefusedInfer],
                         context: grpc.ServicerContext) -> Iterator[mcpb.ModelStreamInferResponse]:
        """Triton's streaming extension: every request on the stream is a ModelInfer request,
        answered on the stream in the order it came, with the ``infer_response`` ModelInfer
        would give or, where ModelInfer would fail, an ``error_message`` (the stream goes on, as
        Triton's does). Up to ``STREAM_WINDOW`` requests are in the server at once: the next one
        is read only when one of them is answered, so a client that sends faster is held back
        by flow control. The stream holds one of the server's stream slots, as a StreamDetect
        does, and ends (UNAVAILABLE, to reconnect) when the server is not ready or drains, or
        when it sends nothing for the stream idle timeout (``--stream-idle-timeout-s``; Triton
        never ends an idle stream: a tritonclient user calls ``stop_stream`` and
        ``start_stream`` again after that error). A client that stops reading its answers has
        its call cancelled once an answer could not be sent for the same timeout. A client's
        cancel is no error: its frames still queued leave the queues."""
        self._check_ready()
        stream = InferStream(self, requests, context, STREAM_WINDOW, self._limits.stream_idle_timeout_s)
        metrics = self._metrics

        def ended() -> None:
            stream.cancel()
            metrics.stream_closed()

        if not self._limits.streams.hold(context, metrics.stream_opened, ended):  # the call already ended
            return
        yield from stream.responses()

    def _start(self, request: kpb.ModelInferRequest | RefusedInfer, remaining_s: float | None,
               owner: Any) -> Started:
        """Take a request in: check it, count, decode and queue its frames. ``remaining_s``: the
        call's time left (None: no deadline); ``owner``: whose decodes these are."""
        if isinstance(request, RefusedInfer):
            raise InvalidInputError(request.reason)
        scheduler, model = self._check_serving(request.model_name, request.model_version)
        pipeline = model.pipeline
        opts, camera_ids, timeout_ms, final_flag = parse_parameters(request.parameters,
                                                                    self._max_class_filter or len(pipeline.classes))
        pipeline.options(opts)  # bad options fail the request before any frame is counted
        wanted = requested_outputs(request)
        frames = request_frames(request, model.max_batch)
        cameras = frame_cameras(camera_ids, frames.count)
        deadline = deadline_ms(timeout_ms, remaining_s)
        tasks = [FrameTask(camera, 0, 0, deadline_ms=deadline, model=model) for camera in cameras]
        for task in tasks:
            self._metrics.frame_received(task.camera_id)
        try:  # over capacity: all refused before any is decoded, not after all were
            # Its frames' classes in the order _submit queues them: a frame past the room left
            # sheds a lower one, which may be one of the request's own (failing it all the same).
            scheduler.check_room(priorities=[self._limits.priority_of(t.camera_id) for t in tasks])
        except OverloadedError as exc:
            _answer_all(tasks, FrameStatus.OVERLOADED, str(exc), pipeline, self._metrics)
            raise
        self._prepare(request.ByteSize(), frames, tasks, opts, pipeline, owner)
        keys = self._submit(scheduler, tasks, pipeline)
        return Started(request.id, scheduler, model, tasks, keys, wanted, final_flag)

    def _finish(self, started: Started, active: Callable[[], bool]) -> kpb.ModelInferResponse | None:
        """Wait for a started request's frames and answer it; None if the call ended first
        (``active()`` false), its frames then taken out of the queues."""
        for task in started.tasks:
            while not task.done.wait(0.25):
                if not active():  # the client cancelled or its deadline passed
                    started.cancel(self._metrics)
                    return None
        if not active():  # ended as the frames were answered (a stream's cancel answers them CANCELLED)
            started.cancel(self._metrics)
            return None
        if not started.settle():  # the stream's cancel took it between the check and here: counted dropped
            return None
        pipeline = started.model.pipeline
        answers = [finish_task(t, pipeline, self._metrics, answer_errors=True) for t in started.tasks]
        for index, (task, answer) in enumerate(zip(started.tasks, answers, strict=True)):
            _raise_unanswered(index, task, answer)
        return infer_response(started.request_id, started.model, [a.detections for a in answers], started.wanted)

    def _prepare(self, size: int, frames: RequestFrames, tasks: list[FrameTask], opts: RequestOptions,
                 pipeline: FramePipeline, owner: Any = None) -> None:
        """Decode + letterbox every frame; on any failure every frame is answered (and counted).
        ``owner``: whose decodes these are for the decode slots' fairness (a client: its peer)."""
        if not self._limits.undecoded.try_take(size):
            _answer_all(tasks, FrameStatus.OVERLOADED, "undecoded-bytes budget full", pipeline, self._metrics)
            raise OverloadedError(f"{self._limits.undecoded.name} is full ({size} bytes do not fit); retry later")
        index = 0
        try:
            for index, task in enumerate(tasks):
                if self._cameras and task.camera_id not in self._cameras:
                    raise InvalidInputError(f"camera {task.camera_id!r} is not in the server's camera allow-list "
                                            f"{sorted(self._cameras)}")
                frame = frames.frame(index, task.camera_id)
                with self._limits.decode.slot(owner):
                    task.prepared = pipeline.prepare(frame, opts)
        except InvalidInputError as exc:
            message = f"{INPUT}[{index}]: {exc}" if len(tasks) > 1 else str(exc)
            _answer_all(tasks, FrameStatus.INVALID, message, pipeline, self._metrics)
            raise InvalidInputError(message) from exc
        except Exception as exc:  # the call fails as it would; its frames are counted first
            _answer_all(tasks, FrameStatus.OVERLOADED, f"not processed: {type(exc).__name__}", pipeline, self._metrics)
            raise
        finally:
            self._limits.undecoded.give_back(size)

    def _submit(self, scheduler: Scheduler, tasks: list[FrameTask], pipeline: FramePipeline) -> list[tuple[str, int]]:
        """Queue every frame, each in a queue of its own; all or none (the queued ones cancelled)."""
        keys: list[tuple[str, int]] = []
        try:
            for task in tasks:
                assert task.prepared is not None  # _prepare prepared every frame or raised
                key = ("kserve", next(_ids))
                deadline = task.received + task.deadline_ms / 1000.0 if task.deadline_ms else None
                job = Job(key=key, tensor=task.prepared.tensor, on_done=task.complete, deadline=deadline,
                          model=task.model, priority=self._limits.priority_of(task.camera_id))
                # One frame and an idle engine: run it on this thread (several frames are
                # queued together, so that they are batched).
                if not (len(tasks) == 1 and scheduler.run_if_idle(job, transient=True)):
                    scheduler.submit(job, transient=True)
                keys.append(key)
        except (OverloadedError, NotReadyError) as exc:
            for key in keys:
                scheduler.close(key)
            for task in tasks[len(keys):]:
                task.answer_now(FrameStatus.OVERLOADED, str(exc))
            for task in tasks:
                task.done.wait()  # a frame already taken into a batch is answered when it ends
                finish_task(task, pipeline, self._metrics, answer_errors=True)
            raise
        return keys


def _names(model: ServedModel, name: str, version: str) -> bool:
    """Whether ``name`` / ``version`` ("" = any) name the served model."""
    return name == model.manifest.name and version in ("", model.version)


def _answer_all(tasks: list[FrameTask], status: FrameStatus, message: str, pipeline: FramePipeline,
                metrics: Metrics) -> None:
    for task in tasks:
        task.answer_now(status, message)
        finish_task(task, pipeline, metrics)  # counts the drop


def _raise_unanswered(index: int, task: FrameTask, answer: FrameAnswer) -> None:
    """Raise the error a frame answered without detections fails its request with: INTERNAL
    when the server failed on it (inference or post-processing), as for ``Detect``."""
    status, message = answer.status, answer.message
    if status is FrameStatus.OK:
        return
    if answer.internal_error:
        raise ModelError(f"{INPUT}[{index}]: {message}")
    result = task.result.status if task.result is not None else None
    if result is JobStatus.CANCELLED:
        raise NotReadyError(SHUTTING_DOWN)
    if status is FrameStatus.EXPIRED:
        raise DeadlineError(f"{INPUT}[{index}]: {message or 'its deadline passed before it was answered'}")
    raise OverloadedError(f"{INPUT}[{index}]: {status.value.lower()}: {message or 'not inferred'}; retry later")


__all__ = ["KServeService", "SERVICE_NAME"]
