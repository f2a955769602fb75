"""One StreamDetect session with a bounded send window and transparent reconnects (sync).

The caller ``send()``s frames (blocking while ``window`` frames are unanswered) and gets every
answer through ``on_result(frame, result)`` on the session's receiver thread, in order. If the
stream breaks (server restarted, went away, hung, or drained), the session reconnects with
exponential backoff and jitter to the next server address and re-sends the frames that were
on the wire but unanswered, so every accepted frame is answered exactly once; a duplicate
answer to a re-sent frame is ignored. A frame a draining server refused ("shutting down",
``client_status.is_drain_refusal``) is not an answer: it is re-sent after the reconnect too.
When a streak of failures reaches a bound of ``config.backoff`` (``give_up_after_s`` seconds,
or ``max_attempts``) the session gives up: ``send()`` and ``close()`` raise, ``lost`` lists
the frames never answered and ``refusals`` which of them a draining server had refused.

The StreamDetect call holds one of the server's stream slots, so the session opens it only
when it has a frame to send (at the first ``send()``, not when it is made) and ends it by
itself once nothing was in flight for ``config.idle_close_s`` (a half-close: the server ends
the call cleanly), well before the server's own idle timeout would; the next frame opens a new
call. That quiet end is no failure: no reconnect, no backoff, nothing logged above DEBUG; nor
is a call the server ends while nothing is in flight (its own idle timeout, shorter than
``idle_close_s``). Frames sent while a half-closed call has not ended yet wait for it; a
server that never ends it is taken as hung after ``response_timeout_s``.

Those rules live in ``resend_window.ResendWindow``, shared with the asyncio session; this
module adds the threads, the lock and gRPC.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from client.backoff import Backoff
from client.channels import ChannelPool
from client.client_status import is_drain_refusal
from client.config import ClientConfig
from client.convert import RequestOptions, from_response, to_request
from client.errors import is_retryable, translate
from client.frames import FrameResult, SourceFrame
from client.resend_window import Next, ResendWindow, WindowCounters
from perception.errors import NotReadyError, PerceptionError
from perception.v1 import detector_pb2_grpc

log = logging.getLogger(__name__)

ResultCallback = Callable[[SourceFrame, FrameResult], None]


class StreamSession(WindowCounters):
    """A bidirectional stream for one or more cameras; use as a context manager."""

    def __init__(
        self,
        pool: ChannelPool,
        config: ClientConfig,
        on_result: ResultCallback,
        options: RequestOptions | None = None,
        name: str = "stream",
    ) -> None:
        self._pool = pool
        self._config = config
        self._on_result = on_result
        self._options = options
        self.name = name
        self._cond = threading.Condition()
        self._window = ResendWindow(config.window, Backoff(config.backoff), name)
        self._call: Any = None
        self._cancelled_by_us = False
        self.callback_error: Exception | None = None
        self.address = ""
        self._stop_watchdog = threading.Event()
        self._wake = threading.Event()  # ends a backoff wait early: the session was aborted
        self._thread = threading.Thread(target=self._run, name=f"{name}-recv", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)
        self._thread.start()
        self._watchdog.start()

    @property
    def accepted(self) -> int:
        """Frames ``send()`` accepted."""
        return self._window.accepted

    @property
    def error(self) -> PerceptionError | None:
        """Why the session ended without answering everything (gave up, aborted), else None."""
        return self._window.error

    @property
    def give_up_note(self) -> str:
        """How the session gave up by itself ("gave up after 9 reconnect attempts in 120.0 s"),
        or "" when it did not."""
        return self._window.give_up_note

    # -- caller side ---------------------------------------------------------------------

    def send(self, frame: SourceFrame, timeout: float | None = None) -> bool:
        """Queue a frame; blocks while the window is full. False on timeout; raises if the
        session gave up or was closed."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._window.can_accept:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            self._window.accept(frame)
            self._cond.notify_all()
        return True

    @property
    def in_flight(self) -> int:
        """Accepted frames not answered yet."""
        with self._cond:
            return self._window.in_flight

    def close(self, timeout: float | None = None) -> None:
        """No more frames: wait until every accepted frame is answered (or the session gives
        up, which raises)."""
        with self._cond:
            self._window.close()
            self._cond.notify_all()
        self._thread.join(timeout)
        self._stop_watchdog.set()
        if self._thread.is_alive():
            late = NotReadyError(f"{self.name}: {self.in_flight} frames still unanswered after {timeout}s")
            self.abort(late)
            raise late
        if self._window.error is not None:
            raise self._window.error
        if self.callback_error is not None:
            raise PerceptionError(f"{self.name}: on_result failed: {self.callback_error}") from self.callback_error

    def abort(self, reason: PerceptionError | None = None) -> None:
        """Stop now; unanswered frames go to ``lost`` and ``reason`` (default: "aborted")
        becomes the session's error, unless it already had one."""
        if not self._thread.is_alive():
            self._stop_watchdog.set()
            return
        with self._cond:
            self._window.abort(reason or PerceptionError(f"{self.name}: aborted"))
            self._cond.notify_all()
            call = self._call
        self._stop_watchdog.set()
        self._wake.set()
        if call is not None:
            call.cancel()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the receiver thread to end (after ``close`` or ``abort``): then no
        ``on_result`` call is running or will come. False if it is still running."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- wire side -----------------------------------------------------------------------

    def _requests(self, generation: int) -> Iterator[Any]:
        with self._cond:
            resend = self._window.resend(time.perf_counter())
        for frame in resend:
            yield to_request(frame, self._options, self._config.deadline_ms, resent=True)
        while True:
            with self._cond:
                while not self._window.has_work(generation):
                    if self._window.close_if_idle(generation, time.perf_counter(), self._config.idle_close_s):
                        log.debug("%s: nothing to send for %gs; closing the stream", self.name,
                                  self._config.idle_close_s)
                        return  # the half-close: the server answers what it has and ends the call
                    self._cond.wait(0.2)
                next_frame = self._window.take(generation, time.perf_counter())
            if next_frame is None:
                return
            yield to_request(next_frame, self._options, self._config.deadline_ms)

    def _run(self) -> None:
        """The receiver thread. Whatever ends it, the session ends with an error if frames are
        left: an exception that is no gRPC error (a channel closed under the session, say) used
        to end the thread silently, with senders blocked and the frames in no count."""
        try:
            self._serve()
        except Exception as exc:
            log.exception("%s: the stream's receiver failed", self.name)
            with self._cond:
                self._window.abort(PerceptionError(f"{self.name}: the stream's receiver failed: "
                                                   f"{type(exc).__name__}: {exc}"))
                self._cond.notify_all()

    def _serve(self) -> None:
        stub_cache: dict[Any, Any] = {}  # by channel: an address gone and back has a new channel
        while True:
            with self._cond:
                while not self._window.wants_connection:  # nothing to send: hold no stream slot
                    self._cond.wait()
                generation = self._window.begin_connection()
                if generation is None:
                    return
                self._cancelled_by_us = False
            endpoint = self._pool.next()
            self.address = endpoint.address
            stub = stub_cache.get(endpoint.channel)
            if stub is None:
                stub = stub_cache[endpoint.channel] = detector_pb2_grpc.DetectorStub(endpoint.channel)
            failure: PerceptionError | None = None
            retry = True
            try:
                call = stub.StreamDetect(self._requests(generation), metadata=self._config.metadata())
                with self._cond:
                    self._call = call
                    aborted = self._window.error is not None  # abort() came before the call was set
                if aborted:
                    call.cancel()
                for resp in call:
                    self._handle(resp)
                with self._cond:
                    if self._window.finished:
                        return
                    quiet = self._window.ended_quietly
                if not quiet:
                    failure = NotReadyError(f"server {endpoint.address} ended the stream with frames unanswered")
            except grpc.RpcError as exc:
                failure = translate(exc, endpoint.address)
                retry = is_retryable(exc.code(), exc.details()) or self._cancelled_by_us
            finally:
                with self._cond:
                    self._call = None
                    self._window.end_connection()
                    self._cond.notify_all()
            if failure is None:  # closed by us, quiet: the next frame opens the next call
                continue
            with self._cond:
                decision = self._window.after_failure(failure, retry, time.monotonic())
                self._cond.notify_all()  # a give-up wakes blocked senders, which then raise
            if decision.next is Next.IDLE:  # e.g. the server's idle timeout: nothing was lost
                log.debug("%s: %s, with nothing in flight", self.name, failure)
                continue
            if decision.next is Next.STOP:
                return
            if decision.next is Next.GIVE_UP:
                log.error("%s: %s: %s", self.name, self._window.give_up_note, failure)
                return
            # The first failure of a streak is news; the retries that follow are not.
            level = logging.WARNING if decision.first_of_streak else logging.INFO
            log.log(level, "%s: %s; reconnecting in %.2fs", self.name, failure, decision.delay_s)
            self._wake.wait(decision.delay_s)

    def _handle(self, resp: Any) -> None:
        now = time.perf_counter()
        result = from_response(resp)
        key = (result.camera_id, result.sequence)
        if is_drain_refusal(result):
            # Not an answer: the frame stays on the wire and is re-sent after the reconnect
            # (the draining server ends this stream once its in-flight frames are answered).
            with self._cond:
                refused = self._window.refuse(result.camera_id, result.sequence, result.message)
            if refused is not None:
                log.info("%s: frame %s refused by draining server %s; it will be re-sent", self.name, key,
                         self.address)
            return
        with self._cond:
            answered = self._window.answer(result.camera_id, result.sequence, now)
            if answered is not None:
                self._cond.notify_all()
        if answered is None:
            log.debug("%s: ignoring an answer to %s that is not in flight (a re-sent duplicate)", self.name, key)
            return
        if answered.reconnected:
            log.info("%s: reconnected to %s", self.name, self.address)
        result = dataclasses.replace(result, latency_ms=answered.latency_ms)
        try:
            self._on_result(answered.frame, result)
        except Exception as exc:  # the caller's callback must not kill the receiver thread
            log.exception("%s: on_result failed", self.name)
            self.callback_error = self.callback_error or exc

    def _watch(self) -> None:
        timeout = self._config.response_timeout_s
        while not self._stop_watchdog.wait(min(0.5, timeout / 4)):
            with self._cond:
                if self._call is None or not self._window.stalled(time.perf_counter(), timeout):
                    continue
                call = self._call
                self._cancelled_by_us = True
            log.warning("%s: no answer for %.1fs; dropping the connection", self.name, timeout)
            call.cancel()
