"""One ``StreamDetect`` call: reader -> pre-processor -> scheduler -> handler, per stream.

- The reader thread only takes requests off the wire: each frame gets a task in the stream's
  ordered outbox and waits in a small per-camera inbox. When a camera's inbox is full, its
  oldest frame is answered stale before anything was spent decoding it: an overloaded server
  does not decode frames it would throw away.
- The pre-processor thread decodes + letterboxes the waiting frames (round robin across the
  stream's cameras) and submits them to the scheduler. A camera's next frame is decoded only
  while it has fewer than ``queue_size`` frames in the engine's hands (decoding, queued or in a
  batch); until then only its newest frame waits, so frames the engine could not serve are
  answered stale before they were decoded, not after. (Decoding them all and letting the
  scheduler's queue drop the older ones spent a third of the decodes on frames thrown away,
  at 8 cameras x 30 fps.) A frame that finds the engine idle and no
  frame of its stream waiting to be decoded runs on this thread instead (Scheduler.run_if_idle).
- The handler thread yields answers strictly in arrival order, post-processing each.

A stream whose frames cannot be served (undecodable, over the limits, malformed) is read
slower after each one (``server.limits.InvalidBackoff``, at most one request per second by
default): a client flooding garbage keeps its bytes, by flow control, instead of costing the
server a receive and a decode attempt per message.

The outbox is bounded: when a client stops reading, the reader stops taking frames, so HTTP/2
flow control pushes back on the client and the server's memory stays flat. It is bounded in
bytes too (``--max-stream-inflight-bytes``): a stream of big frames has one in the server at a
time. Undecoded bytes are budgeted per stream and for the whole server (``server.limits``): a
frame that does not fit is answered OVERLOADED at once and its bytes let go. Decodes of every stream share one pool of
slots sized to the cores. A stream that sends nothing for the idle timeout is ended
(UNAVAILABLE: the client reconnects when it has frames). A stream whose client stops reading
its answers is cancelled once no answer could be sent for the same timeout (the send watchdog,
``_watch_sends``): its send blocks inside gRPC when the client's HTTP/2 window is full, where no
check of this module runs, and it would otherwise hold its slot and threads until the
connection ages out. Cancellation (or the end of the call) closes the stream's scheduler
queues, releasing every tensor it held.

A stream carries at most ``ServiceLimits.max_stream_cameras`` distinct camera ids; a frame of one
more is answered INVALID (the stream remembers every camera it carried, to close its queues).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from perception.errors import InvalidInputError, NotReadyError, OverloadedError
from perception.pipeline import MAX_CAMERA_ID_LEN, FrameInput, FramePipeline, Prepared, RequestOptions
from perception.types import FrameStatus
from server.answer import FrameAnswer, FrameTask, TrackSource, finish_task, track_answer
from server.limits import InvalidBackoff, ServiceLimits, take_both
from server.metrics_protocol import Metrics
from server.scheduler import Job, Scheduler

log = logging.getLogger(__name__)
_ids = itertools.count(1)
METHOD = "StreamDetect"  # the grpc_error metric's method label for errors answered per frame
SHUTTING_DOWN = "server is shutting down; reconnect to another instance or retry"

# (request) -> (frame, options); raises InvalidInputError. Keeps protobuf out of this module.
Converter = Callable[[Any], tuple[FrameInput, RequestOptions]]
# (request) -> (camera_id, sequence, capture_timestamp_ns, deadline_ms); never raises.
Identifier = Callable[[Any], tuple[str, int, int, int]]


class StreamSession:
    """Serve one bidirectional stream of frames (possibly from several cameras)."""

    def __init__(
        self,
        pipeline: FramePipeline,
        scheduler: Scheduler,
        convert: Converter,
        identify: Identifier,
        metrics: Metrics,
        outbox_size: int,
        admit_camera: Callable[[str], None],
        draining: Callable[[], bool],
        limits: ServiceLimits | None = None,
        current_model: Callable[[], tuple[FramePipeline, Any]] | None = None,
        trackers: TrackSource | None = None,
        cancel_call: Callable[[], object] | None = None,
        owner: str = "",
    ) -> None:
        self._trackers = trackers
        self._owner = owner  # the client's host: whose cameras these are, for tracking
        # Ends the gRPC call (context.cancel): the one way to unblock a send the client's full
        # window holds inside gRPC (the send watchdog).
        self._cancel_call = cancel_call
        self.id = next(_ids)
        # The pipeline and model a new frame is prepared for (they change on a hot swap).
        self._current_model = current_model or (lambda: (pipeline, None))
        self._limits = limits or ServiceLimits()
        self._bytes = self._limits.stream_budget()
        self._last_request = time.monotonic()
        self._last_answer = 0.0  # when the last answer was sent (monotonic; 0: none yet)
        self._idle = False
        self._pipeline = pipeline
        self._scheduler = scheduler
        self._convert = convert
        self._identify = identify
        self._metrics = metrics
        self._outbox_size = outbox_size
        self._inflight = 0  # request bytes of the frames in the outbox (under _lock)
        self._admit_camera = admit_camera
        self._draining = draining
        # One lock; three conditions on it, so that each event wakes only the thread it concerns
        # (a notify_all of one condition woke all three on every answered frame).
        self._lock = threading.Lock()
        self._answerable = threading.Condition(self._lock)  # the handler: the oldest frame is done
        self._room = threading.Condition(self._lock)  # the reader: room in the outbox
        self._work = threading.Condition(self._lock)  # the pre-processor: frames in the inbox
        self._watch = threading.Condition(self._lock)  # the send watchdog: the stream ended
        # When the answer being sent was handed to gRPC; None while no send is in progress.
        self._sending_since: float | None = None
        self._outbox: deque[FrameTask] = deque()  # every unanswered frame, in arrival order
        # camera -> frames waiting to be decoded (task, request, its size); round-robin order.
        self._inbox: dict[str, deque[tuple[FrameTask, Any, int]]] = {}
        # Room for a client's usual send window (4) without a drop; beyond it the camera is
        # sending faster than it is served and the oldest undecoded frame is stale.
        self._inbox_size = scheduler.queue_size + 2
        # camera -> its frames taken for decoding and not yet answered (decoding, queued for a
        # batch, or in one). At most ``_max_in_flight``: a camera's next frame is decoded only
        # when the engine is ready to take it; meanwhile the newest one waits undecoded, and
        # frames it replaces are answered stale without ever being decoded.
        self._in_flight: dict[str, int] = {}
        self._max_in_flight = scheduler.queue_size
        self._keys: set[tuple[int, str]] = set()
        # Distinct camera ids taken off the wire (by the reader), at most max_stream_cameras: every
        # key above is one of them, and each is remembered until the stream ends.
        self._cameras: set[str] = set()
        self._reader_done = False
        # The reader has a request off the wire that is not in the outbox yet (it is being
        # identified and counted): the stream holds a frame, and a drain or the idle timeout
        # that ended it now would leave that frame unanswered.
        self._taking = False
        self._cancelled = False
        self._stopped_for_drain = False
        self._backoff = InvalidBackoff(self._limits.invalid_backoff_max_s)
        self._backoff_logged = False

    # -- called by the servicer ------------------------------------------------------------

    def answers(self, requests: Iterable[Any]) -> Iterator[FrameAnswer]:
        """Answers in arrival order until the client half-closes (or the call ends).

        Raises NotReadyError at the end if the server started draining mid-stream.
        """
        for target, name, args in ((self._read, "reader", (requests,)), (self._prepare_loop, "prep", ()),
                                   (self._watch_sends, "watch", ())):
            threading.Thread(target=target, args=args, name=f"stream-{self.id}-{name}", daemon=True).start()
        try:
            while True:
                with self._lock:
                    while not self._cancelled and not (self._outbox and self._outbox[0].done.is_set()):
                        empty = not self._outbox and not self._taking  # the stream holds no frame
                        if empty and (self._reader_done or self._draining()):
                            # Shutting down: in-flight frames are answered, then the call ends.
                            self._stopped_for_drain = self._stopped_for_drain or not self._reader_done
                            break
                        # Quiet since the client's last frame or this stream's last answer, the
                        # later: a client in lockstep sends its next frame once it has the answer.
                        quiet_s = time.monotonic() - max(self._last_request, self._last_answer)
                        if empty and quiet_s > self._limits.stream_idle_timeout_s:
                            self._idle = True
                            break
                        self._answerable.wait(0.1 if self._draining() else 0.5)
                    if self._cancelled or not self._outbox:
                        break
                    task = self._outbox.popleft()
                    self._inflight -= task.size
                    self._room.notify()  # room in the outbox for the reader
                answer = finish_task(task, self._pipeline, self._metrics, answer_errors=True)
                if answer.internal_error:
                    # One failed batch or post-processing must not end the stream and discard its
                    # other answers: the traceback is in the log already; the frame is answered,
                    # counted INTERNAL as a unary call's failure is.
                    log.error("stream %d: camera %r frame %d: %s",
                              self.id, task.camera_id, task.sequence, answer.message)
                    self._count_internal()
                answer = track_answer(answer, task, self._trackers)  # may first wait for the tracker's load
                # Until the caller asks for the next answer, this one is being sent: gRPC's send
                # returns once the client's flow-control window has room for it.
                self._sending_since = time.monotonic()
                yield answer
                self._sending_since = None
                self._last_answer = time.monotonic()
        finally:
            self.cancel()
        if self._stopped_for_drain:
            raise NotReadyError(SHUTTING_DOWN)
        if self._idle:
            raise NotReadyError(f"stream sent no frame for {self._limits.stream_idle_timeout_s:g} s and was ended; "
                                "reconnect when there are frames to send")

    def cancel(self) -> None:
        """The call ended or was cancelled: drop everything the stream still holds."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            keys = list(self._keys)
            held = sum(n for waiting in self._inbox.values() for _, _, n in waiting)
            unanswered = list(self._outbox)
            self._outbox.clear()
            self._inflight = 0
            self._inbox.clear()
            self._wake_all()
        self._release(held)
        for key in keys:
            self._scheduler.close(key)
        now = time.monotonic()
        for task in unanswered:  # counted received; the client left before their answers
            self._metrics.frame_dropped(task.camera_id, "cancelled")
            stats = getattr(task.model, "stats", None)
            if stats is not None and task.prepared is not None:  # decoded for the model: a failure there
                stats.answered(False, now - task.received)

    # -- the send watchdog -----------------------------------------------------------------

    def _watch_sends(self) -> None:
        """Cancel the call when an answer could not be sent for ``stream_idle_timeout_s``.

        A client that stops reading fills its HTTP/2 window, and the send of the next answer
        then blocks inside gRPC: the idle check of ``answers`` never runs again, and the
        stream's slot, its handler thread and its reader and pre-processor threads were held
        until the connection aged out (``max_connection_age_s`` plus grace, 30 min by default).
        Cancelling the call fails the blocked send, and the call's end releases all of them.
        Sleeps between checks for as long as no stall can be due: about one wake-up per
        timeout while answers flow."""
        timeout = self._limits.stream_idle_timeout_s
        with self._lock:
            while True:
                if self._cancelled:
                    return
                since = self._sending_since
                now = time.monotonic()
                if since is not None and now - since > timeout:
                    break
                self._watch.wait(timeout if since is None else since + timeout - now + 0.01)
        log.warning("stream %d: no answer could be sent for %g s (the client stopped reading); cancelling it",
                    self.id, timeout)
        if self._cancel_call is not None:
            self._cancel_call()
        self.cancel()

    # -- the reader thread -----------------------------------------------------------------

    def _read(self, requests: Iterable[Any]) -> None:
        try:
            pending = iter(requests)
            while True:
                # Room first, then the next request: a frame read while the outbox is full would
                # be held here, beside the one gRPC already buffers for the stream.
                if not self._wait_for_room():
                    break
                request = next(pending, None)
                if request is None:
                    break
                # Only now, not while next() waits for the client: a stream waiting for its
                # client's next frame holds none, and a drain must not wait for it.
                with self._lock:
                    self._taking = True
                if self._draining():
                    # Already taken off the wire: answer it rather than drop it silently.
                    self._stopped_for_drain = True
                    self._take(request, refuse=SHUTTING_DOWN)
                    break
                self._take(request)
                request = None  # the inbox holds it now; not this thread while it waits
        except Exception as exc:  # the call was cancelled or the client went away
            if not self._cancelled:
                log.debug("stream %d: request stream ended: %s", self.id, exc)
        finally:
            with self._lock:
                self._reader_done = True
                self._taking = False  # a request _take failed on is not waited for
                self._wake_all()

    def _wait_for_room(self) -> bool:
        """Room in the outbox, and past the wait of any unservable frames (InvalidBackoff).

        Room in frames (``outbox_size``) and in bytes: once the stream's unanswered requests
        (and the model outputs of those inferred, ``_held_locked``) add up to
        ``stream_inflight_bytes`` (4 MiB by default), the next is taken off the wire only when
        they are answered. A stream of big frames (raw, 4K) has one in the server at
        a time; a stream of camera JPEGs (0.1-0.5 MB) still a pipeline of them. 32 streams of
        7.9 MB frames sent back to back (bench_soak --only big): RSS max 844-852 MB without
        it, 483-554 MB with it, and every frame answered OK instead of one in seven refused
        OVERLOADED for want of budget (each read in full only to be let go). The cost: one
        stream of raw 1080p frames (6.2 MB) flat out is served 102-105 frames/s instead of
        124-128, each a third sooner (bench_shm). Not tuned further.

        A wait of the server's own making does not count towards the idle timeout: the idle
        clock restarts when the reader may read again."""
        waited = False
        with self._lock:
            while not self._cancelled:
                full = len(self._outbox) >= self._outbox_size
                if full or (self._outbox and self._held_locked() >= self._limits.stream_inflight_bytes):
                    waited = True
                    self._room.wait(0.5)
                    continue
                if waited:
                    self._last_request = time.monotonic()
                wait = self._backoff.until - time.monotonic()
                if wait <= 0:
                    break
                self._room.wait(wait)
            return not self._cancelled

    def _held_locked(self) -> int:
        """Bytes the stream's unanswered frames hold: their requests', and the model outputs of
        those inferred and waiting for their turn to be answered (post-processed then). Outputs
        counted too: a client that sent small frames (tiny JPEGs, shared-memory frames of 100
        bytes) and stopped reading had every frame decoded and inferred until the outbox was
        full, each holding its output (2.8 MB for a YOLOv8 COCO head: 90 MB a stream, counted as
        6,400 bytes, in a review's run)."""
        return self._inflight + sum(task.output_bytes for task in self._outbox)

    def _take(self, request: Any, refuse: str = "") -> None:
        """Queue a request for decoding; with ``refuse``, answer it OVERLOADED right away."""
        camera_id, sequence, ts, deadline_ms = self._identify(request)
        self._last_request = time.monotonic()
        task = FrameTask(camera_id, sequence, ts, deadline_ms=deadline_ms, on_change=self._notify, owner=self._owner)
        # Validated before it is counted or becomes an inbox key (metric label, memory).
        invalid = ""
        if len(camera_id) > MAX_CAMERA_ID_LEN:
            invalid = f"camera_id is longer than {MAX_CAMERA_ID_LEN} characters"
        elif camera_id not in self._cameras:  # only this thread touches the set
            if len(self._cameras) >= self._limits.max_stream_cameras:
                invalid = (f"this stream has carried {len(self._cameras)} cameras, the most one stream may; "
                           f"camera {camera_id[:64]!r} is one more (send it on another stream)")
            else:
                self._cameras.add(camera_id)
        self._metrics.frame_received(camera_id)
        size = task.size = request.ByteSize() if hasattr(request, "ByteSize") else 0
        if not (invalid or refuse):
            full = take_both(self._bytes, self._limits.undecoded, size)
            if full:
                refuse = f"{full} is full ({size} bytes do not fit); frame not processed"
        replaced = []
        with self._lock:
            self._taking = False  # in the outbox now, unless the stream is gone
            gone = self._cancelled  # the call ended while this request was read: nothing will decode it
            if not gone:
                self._outbox.append(task)
                self._inflight += size
            if not gone and not (invalid or refuse):
                waiting = self._inbox.setdefault(camera_id, deque())
                waiting.append((task, request, size))
                # A camera the engine is not ready for keeps only its newest frame.
                keep = self._inbox_size if self._ready_locked(camera_id) else 1
                while len(waiting) > keep:
                    replaced.append(waiting.popleft())
                self._work.notify()
        if gone:
            self._metrics.frame_dropped(camera_id, "cancelled")
            if not (invalid or refuse):
                self._release(size)  # taken from the budgets above: cancel() has already summed its own
            return
        if invalid:
            self._unservable(camera_id, invalid)
        if invalid or refuse:
            task.answer_now(FrameStatus.INVALID if invalid else FrameStatus.OVERLOADED, invalid or refuse)
        self._drop_stale(replaced)

    def _drop_stale(self, replaced: list[tuple[FrameTask, Any, int]]) -> None:
        for old, _, old_size in replaced:
            self._release(old_size)
            old.answer_now(
                FrameStatus.DROPPED_STALE, "a newer frame of this camera arrived before this one was decoded"
            )

    def _release(self, n: int) -> None:
        if n:
            self._bytes.give_back(n)
            self._limits.undecoded.give_back(n)

    # -- the pre-processor thread ----------------------------------------------------------

    def _prepare_loop(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._cancelled:
                        return
                    camera = next((c for c in self._inbox if self._ready_locked(c)), None)
                    if camera is not None:
                        break
                    if not self._inbox and self._reader_done:
                        return
                    self._work.wait(0.5)
                waiting = self._inbox.pop(camera)
                task, request, size = waiting.popleft()
                self._in_flight[camera] = self._in_flight.get(camera, 0) + 1
                task.on_change = functools.partial(self._answered_in_flight, camera)
                # Frames that queued while the camera was ready: once it is not, only the
                # newest waits, as for a frame arriving now (``_take``).
                keep = self._inbox_size if self._ready_locked(camera) else 1
                replaced = [waiting.popleft() for _ in range(len(waiting) - keep)]
                if waiting:
                    self._inbox[camera] = waiting  # to the back of the round robin
            self._drop_stale(replaced)
            try:
                self._accept(task, request)
            finally:
                del request  # the frame's bytes go now, not when the next frame arrives
                self._release(size)

    def _prepare(self, task: FrameTask, request: Any) -> Prepared:
        """The frame converted, checked and prepared, all in a decode slot. Converting copies a
        shared-memory frame out of its slot (the undecoded-bytes budgets saw only its ~100-byte
        request): in the slot, the server holds one such copy per slot however many streams wait,
        and none once the frame is prepared (the copy is this method's own)."""
        with self._limits.decode.slot(self.id):
            fin, opts = self._convert(request)
            self._admit_camera(fin.camera_id)
            task.track, task.resent = opts.track, fin.resent
            task.priority = self._limits.priority_of(task.camera_id)
            # The model is taken once the slot is ours: a wait for it can outlast a swap, and the
            # model swapped out is freed a few seconds after.
            pipeline, task.model = self._current_model()
            return pipeline.prepare(fin, opts)

    def _accept(self, task: FrameTask, request: Any) -> None:
        try:  # over capacity: answered before its decode, not after
            self._scheduler.check_room(priority=self._limits.priority_of(task.camera_id),
                                       key=(self.id, task.camera_id))
        except OverloadedError as exc:
            task.answer_now(FrameStatus.OVERLOADED, str(exc))
            return
        try:
            task.prepared = self._prepare(task, request)
        except InvalidInputError as exc:
            self._unservable(task.camera_id, str(exc))
            task.answer_now(FrameStatus.INVALID, str(exc))
            return
        except Exception:  # a bug or a resource error on one frame must not hang the stream
            # The client gets a reason and an id to quote; the details stay in the log.
            error_id = uuid.uuid4().hex[:12]
            log.exception("stream %d: pre-processing camera %r frame %d failed (error id %s)",
                          self.id, task.camera_id, task.sequence, error_id)
            self._count_internal()
            task.answer_now(FrameStatus.INVALID,
                            f"internal error while pre-processing this frame (error id {error_id})")
            return
        key = (self.id, task.camera_id)
        with self._lock:
            self._backoff.served()
            if self._cancelled:
                return
            self._keys.add(key)
            # Nothing of this stream waits to be decoded behind this frame, and the stream has
            # carried no other camera: an idle engine may run it on this thread (no hand-off to
            # the worker and back). Otherwise the worker takes it, so that this thread decodes
            # the next frame meanwhile: a stream carrying several cameras gets their frames
            # close together, and one would wait undecoded for another's inference.
            inline = not self._inbox and self._keys == {key}
        deadline = task.received + task.deadline_ms / 1000.0 if task.deadline_ms else None
        job = Job(key=key, tensor=task.prepared.tensor, on_done=task.complete, deadline=deadline, model=task.model,
                  priority=self._limits.priority_of(task.camera_id))
        try:
            if not (inline and self._scheduler.run_if_idle(job)):
                self._scheduler.submit(job)
        except OverloadedError as exc:
            task.answer_now(FrameStatus.OVERLOADED, str(exc))
        except NotReadyError as exc:
            self._stopped_for_drain = True
            task.answer_now(FrameStatus.OVERLOADED, str(exc))
        except Exception:  # a bug in the hand-off must answer the frame, not end this thread
            error_id = uuid.uuid4().hex[:12]
            log.exception("stream %d: queueing camera %r frame %d failed (error id %s)",
                          self.id, task.camera_id, task.sequence, error_id)
            self._count_internal()
            task.answer_now(FrameStatus.OVERLOADED,  # a no-op if the frame was answered before the error
                            f"internal error while queueing this frame (error id {error_id}); frame not processed")
        with self._lock:
            cancelled = self._cancelled
        if cancelled:
            # cancel() ran between the check above and submit: it may have closed the key
            # before submit re-created its queue, which nobody else would close.
            self._scheduler.close(key)

    def _unservable(self, camera_id: str, reason: str) -> None:
        """A frame the client should not have sent: the reader waits before the next request."""
        with self._lock:
            wait = self._backoff.invalid(time.monotonic())
            first_at_max = wait >= self._backoff.max_s > 0 and not self._backoff_logged
            self._backoff_logged = self._backoff_logged or first_at_max
        if first_at_max:
            log.warning("stream %d: camera %r keeps sending frames that cannot be served (last: %s); "
                        "reading this stream at most once per %g s until its frames are served",
                        self.id, camera_id, reason, self._backoff.max_s)

    def _count_internal(self) -> None:
        self._metrics.grpc_error(METHOD, "INTERNAL")

    def _notify(self) -> None:
        with self._lock:
            self._answerable.notify()

    def _ready_locked(self, camera: str) -> bool:
        return self._in_flight.get(camera, 0) < self._max_in_flight

    def _answered_in_flight(self, camera: str) -> None:
        """A frame taken for decoding was answered (inferred, dropped, or invalid): the camera
        may have its next frame decoded."""
        with self._lock:
            n = self._in_flight.get(camera, 1) - 1
            if n > 0:
                self._in_flight[camera] = n
            else:
                self._in_flight.pop(camera, None)
            self._answerable.notify()
            self._work.notify()

    def _wake_all(self) -> None:
        """Called with the lock held, when the stream ends or its reader does."""
        self._answerable.notify_all()
        self._room.notify_all()
        self._work.notify_all()
        self._watch.notify_all()
