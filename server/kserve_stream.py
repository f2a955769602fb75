"""One ModelStreamInfer call of the KServe front door (``server.kserve``): Triton's streaming
extension, a stream of ModelInfer requests answered in the order they came.

A reader thread takes the requests in (``KServeService._start``: check, decode and queue their
frames, so that the next request's decode overlaps the last one's inference) while the call's
own thread answers them in order. At most ``window`` requests are in the server at once: the
next one is read only when one of them is answered, so a client that sends faster is held back
by HTTP/2 flow control.

The stream ends (UNAVAILABLE: the client reconnects) when the server drains, or when the client
sent no request for the idle timeout. The time the server spends taking a request in (waiting
for a decode slot, decoding, inferring it on the reader's thread) is not quiet: a request that
waited longer than the timeout for a decode slot was lost with the stream it ended.

A client that stops reading its answers fills its HTTP/2 window, and the send of the next answer
then blocks inside gRPC, where no check of this module runs: the stream's slot, its two threads
and its queued frames were held until the connection died. The send watchdog (``_watch_sends``)
cancels the call once one answer could not be sent for the idle timeout, as StreamDetect's does
(``server.stream``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from perception.errors import InvalidInputError, NotReadyError
from perception.v1 import grpc_predict_v2_pb2 as kpb
from perception.v1 import model_config_pb2 as mcpb
from server.answer import FrameTask
from server.errors import status_for
from server.kserve_tensors import EMPTY_FINAL_RESPONSE, FINAL_RESPONSE
from server.limits import InvalidBackoff, ServiceLimits
from server.metrics_protocol import Metrics
from server.scheduler import Scheduler
from server.served_model import ServedModel
from server.wire import RefusedInfer

log = logging.getLogger(__name__)

SHUTTING_DOWN = "server is shutting down; retry on another instance"


@dataclass
class Started:
    """A request taken in (its frames decoded and queued), not yet answered."""

    request_id: str
    scheduler: Scheduler
    model: ServedModel
    tasks: list[FrameTask]
    keys: list[tuple[str, int]]
    wanted: list[str]
    final_flag: bool = False  # the request asked for triton_final_response on its stream answer
    _settled: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def settle(self) -> bool:
        """Claim the request's frames for counting, answered or cancelled: True the first time
        only. The stream's cancel and its handler's wait both cancelled a request whose frames
        the engine held, and each counted them dropped: twice for one frame received."""
        with self._lock:
            settled, self._settled = self._settled, True
            return not settled

    def cancel(self, metrics: Metrics) -> None:
        """Its call ended first: take its frames out of the queues (a frame in a batch is
        answered when it ends, to nobody) and count them dropped, "cancelled", unless they
        were answered or cancelled already."""
        if not self.settle():
            return
        for key in self.keys:
            self.scheduler.close(key)
        for task in self.tasks:
            metrics.frame_dropped(task.camera_id, "cancelled")
            if task.prepared is not None:  # decoded for the model: a failure in its statistics
                self.model.stats.answered(False, time.monotonic() - task.received)


class _Service(Protocol):
    """What a stream uses of the front door (``server.kserve.KServeService``), named here so
    that this module need not import that one, which imports it."""

    _metrics: Metrics
    _limits: ServiceLimits

    def _draining(self) -> bool: ...

    def _start(self, request: kpb.ModelInferRequest | RefusedInfer, remaining_s: float | None,
               owner: Any) -> Started: ...

    def _finish(self, started: Started, active: Callable[[], bool]) -> kpb.ModelInferResponse | None: ...


@dataclass(frozen=True)
class _Refused:
    """A stream's request that failed on the way in, as its answer will say it: the status's
    message only (an exception kept until its turn would keep, through its traceback, the
    request's bytes alive). ``ends_stream``: the server is not ready or drains."""

    request_id: str
    message: str
    ends_stream: bool
    invalid: bool  # the client's fault: the stream is read slower after it
    final_flag: bool = False  # it asked for triton_final_response (as far as it could be read)


class InferStream:
    """One ModelStreamInfer call: ``responses`` answers it, ``cancel`` is called when it ends."""

    def __init__(self, service: _Service, requests: Iterator[kpb.ModelInferRequest | RefusedInfer],
                 context: grpc.ServicerContext, window: int, idle_timeout_s: float) -> None:
        self._service = service
        self._requests = requests
        self._context = context
        self._window = window
        self._idle_timeout_s = idle_timeout_s
        self._cond = threading.Condition()
        self._pending: deque[Started | _Refused] = deque()  # in arrival order
        self._reader_done = False
        self._cancelled = False
        self._ended = threading.Event()  # set with _cancelled: the send watchdog stops
        self._last_activity = time.monotonic()  # a request read or an answer sent
        self._starting = False  # the reader is taking a request in: the stream is not quiet
        # When the answer being sent was handed to gRPC; None while no send is in progress.
        self._sending_since: float | None = None
        # Requests that cannot be served slow the reading, as on a StreamDetect stream: a client
        # sending garbage waits in flow control instead of costing a parse and a decode each.
        self._backoff = InvalidBackoff(service._limits.invalid_backoff_max_s)

    def cancel(self) -> None:
        """The call ended: the reader and the watchdog stop, and the frames of every unanswered
        request leave the queues."""
        with self._cond:
            self._cancelled = True
            started = [item for item in self._pending if not isinstance(item, _Refused)]
            self._pending.clear()
            self._cond.notify_all()
        self._ended.set()
        for item in started:
            item.cancel(self._service._metrics)

    def _active(self) -> bool:
        with self._cond:
            cancelled = self._cancelled
        return not cancelled and self._context.is_active()

    def responses(self) -> Iterator[mcpb.ModelStreamInferResponse]:
        for target, name in ((self._read, "reader"), (self._watch_sends, "watch")):
            threading.Thread(target=target, name=f"kserve-stream-{name}", daemon=True).start()
        while True:
            with self._cond:
                while not self._pending and not self._reader_done and not self._cancelled:
                    # Quiet: a drain ends the stream now (not at the grace period's end), and
                    # so does the idle timeout.
                    if self._service._draining() and not self._starting:  # one being taken in is answered
                        raise NotReadyError(SHUTTING_DOWN)
                    quiet_s = 0.0 if self._starting else time.monotonic() - self._last_activity
                    if quiet_s >= self._idle_timeout_s:
                        raise NotReadyError(f"stream sent no request for {self._idle_timeout_s:g} s and was "
                                            "ended; reconnect when you have frames")
                    self._cond.wait(min(0.1, self._idle_timeout_s - quiet_s))
                if not self._pending:
                    return
                item = self._pending[0]
            response = self._answer(item)
            with self._cond:
                if self._pending and self._pending[0] is item:
                    self._pending.popleft()
                self._cond.notify_all()
            if response is None:
                return
            # Until the call asks for the next answer, this one is being sent: gRPC's send
            # returns once the client's flow-control window has room for it.
            self._sending_since = time.monotonic()
            yield response
            with self._cond:
                self._sending_since = None
                self._last_activity = time.monotonic()

    def _watch_sends(self) -> None:
        """Cancel the call when one answer could not be sent for the idle timeout: the client
        stopped reading, and the send blocks inside gRPC until the call is cancelled. Sleeps
        between checks for as long as no stall can be due: one wake-up per timeout while
        answers flow."""
        timeout_s = self._idle_timeout_s
        sleep_s = timeout_s
        while not self._ended.wait(sleep_s):
            since = self._sending_since
            blocked_s = 0.0 if since is None else time.monotonic() - since
            if blocked_s > timeout_s:
                log.warning("ModelStreamInfer from %s: no answer could be sent for %g s (the client stopped "
                            "reading); cancelling it", self._context.peer(), timeout_s)
                self._context.cancel()  # fails the blocked send; the call's end lets the stream's slot go
                self.cancel()
                return
            sleep_s = timeout_s - blocked_s + 0.01

    def _answer(self, item: Started | _Refused) -> mcpb.ModelStreamInferResponse | None:
        """The stream's answer to one request; None if the call ended first. A server that is
        not ready or drains ends the stream (NotReadyError: the client reconnects elsewhere)."""
        if isinstance(item, _Refused):
            if item.ends_stream:
                raise NotReadyError(item.message)
            return _stream_error(item.request_id, item.message, item.final_flag)
        try:
            response = self._service._finish(item, self._active)
        except Exception as exc:
            if not self._active():  # the call ended: its frames were taken out, not failed
                return None
            if isinstance(exc, NotReadyError):
                raise
            code, message = status_for(exc, "ModelStreamInfer")  # what ModelInfer would fail with
            self._service._metrics.grpc_error("ModelStreamInfer", code.name)
            return _stream_error(item.request_id, message, item.final_flag)
        if response is None:
            return None
        if item.final_flag:  # each request has one answer, so each is its last (Triton's mark)
            response.parameters[FINAL_RESPONSE].bool_param = True
        return mcpb.ModelStreamInferResponse(infer_response=response.SerializeToString())

    def _read(self) -> None:
        owner = ("kserve", self._context.peer())
        try:
            while True:
                with self._cond:
                    while not self._cancelled:
                        wait = self._backoff.until - time.monotonic()
                        if len(self._pending) < self._window and wait <= 0:
                            break
                        self._cond.wait(wait if wait > 0 else None)
                    if self._cancelled:
                        return
                request = next(self._requests, None)
                if request is None:
                    return
                with self._cond:
                    if self._cancelled:  # ended while waiting for the request: no decode for nobody
                        return
                    self._last_activity = time.monotonic()
                    self._starting = True
                item: Started | _Refused
                try:
                    item = self._service._start(request, self._context.time_remaining(), owner)
                except Exception as exc:  # answered in its turn, as ModelInfer would fail
                    item = self._refused(request, exc)
                del request  # its bytes go now, not when the next request arrives
                with self._cond:
                    self._starting = False
                    if not isinstance(item, _Refused):
                        self._backoff.served()
                    elif item.invalid:
                        self._backoff.invalid(time.monotonic())
                    cancelled = self._cancelled
                    if not cancelled:
                        self._pending.append(item)
                        self._cond.notify_all()
                if cancelled:
                    if not isinstance(item, _Refused):
                        item.cancel(self._service._metrics)
                    return
        except Exception as exc:  # the call ended under the reader (gRPC raises from the iterator)
            log.debug("ModelStreamInfer reader ended: %s", exc)
        finally:
            with self._cond:
                self._reader_done = True
                self._cond.notify_all()

    def _refused(self, request: kpb.ModelInferRequest | RefusedInfer, exc: Exception) -> _Refused:
        code, message = status_for(exc, "ModelStreamInfer")  # an internal error is logged here, once
        ends = isinstance(exc, NotReadyError)
        if not ends:  # the stream's end is counted where it ends (the error interceptor)
            self._service._metrics.grpc_error("ModelStreamInfer", code.name)
        final_flag = False
        if isinstance(request, kpb.ModelInferRequest):
            asked = request.parameters.get(EMPTY_FINAL_RESPONSE)
            final_flag = asked is not None and asked.WhichOneof("parameter_choice") == "bool_param" and asked.bool_param
        return _Refused(getattr(request, "id", ""), message, ends, isinstance(exc, InvalidInputError), final_flag)


def _stream_error(request_id: str, message: str, final_flag: bool = False) -> mcpb.ModelStreamInferResponse:
    response = kpb.ModelInferResponse(id=request_id)
    if final_flag:
        response.parameters[FINAL_RESPONSE].bool_param = True
    return mcpb.ModelStreamInferResponse(error_message=message, infer_response=response.SerializeToString())


__all__ = ["InferStream", "SHUTTING_DOWN"]
