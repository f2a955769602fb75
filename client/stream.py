"""One StreamDetect session with a bounded send window and transparent reconnects (sync).

The caller ``send()``s frames (blocking while ``window`` frames are unanswered) and gets every
answer through ``on_result(frame, result)`` on the session's receiver thread, in order. If the
stream breaks (server restarted, went away, hung), the session reconnects with exponential
backoff and jitter to the next server address and re-sends the frames that were on the wire
but unanswered, so every accepted frame is answered exactly once; a duplicate answer to a
re-sent frame is ignored. After ``backoff.max_attempts`` consecutive failures the session
gives up: ``send()`` and ``close()`` raise, and ``lost`` lists the frames never answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc

from client.backoff import Backoff
from client.channels import ChannelPool
from client.config import ClientConfig
from client.convert import RequestOptions, from_response, to_request
from client.errors import is_retryable, translate
from client.frames import FrameResult, SourceFrame
from perception.errors import NotReadyError, PerceptionError
from perception.v1 import detector_pb2_grpc

log = logging.getLogger(__name__)

ResultCallback = Callable[[SourceFrame, FrameResult], None]


@dataclass
class _Pending:
    frame: SourceFrame
    sent: float  # time.perf_counter() when (last) written to the wire


class StreamSession:
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
        self._queue: deque[SourceFrame] = deque()  # accepted, not yet on the wire
        self._inflight: OrderedDict[tuple[str, int], _Pending] = OrderedDict()
        self._free = config.window
        self._closed = False
        self._generation = 0
        self._error: PerceptionError | None = None
        self._call: Any = None
        self._cancelled_by_us = False
        self.reconnects = 0
        self.lost: list[SourceFrame] = []
        self.callback_error: Exception | None = None
        self.address = ""
        self._backoff = Backoff(config.backoff)
        self._stop_watchdog = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-recv", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)
        self._thread.start()
        self._watchdog.start()

    # -- caller side ---------------------------------------------------------------------

    def send(self, frame: SourceFrame, timeout: float | None = None) -> bool:
        """Queue a frame; blocks while the window is full. False on timeout; raises if the
        session gave up or was closed."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._free <= 0 and self._error is None:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            if self._error is not None:
                raise self._error
            if self._closed:
                raise PerceptionError(f"{self.name}: send() after close()")
            self._free -= 1
            self._queue.append(frame)
            self._cond.notify_all()
        return True

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._config.window - self._free

    def close(self, timeout: float | None = None) -> None:
        """No more frames: wait until every accepted frame is answered (or the session gives
        up, which raises)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._stop_watchdog.set()
        if self._thread.is_alive():
            self.abort()
            raise NotReadyError(f"{self.name}: {self.in_flight} frames still unanswered after {timeout}s")
        if self._error is not None:
            raise self._error
        if self.callback_error is not None:
            raise PerceptionError(f"{self.name}: on_result failed: {self.callback_error}") from self.callback_error

    def abort(self) -> None:
        """Stop now; unanswered frames go to ``lost``."""
        if not self._thread.is_alive():
            self._stop_watchdog.set()
            return
        with self._cond:
            self._closed = True
            if self._error is None:
                self._error = PerceptionError(f"{self.name}: aborted")
            self._give_up_locked()
            call = self._call
        self._stop_watchdog.set()
        if call is not None:
            call.cancel()

    def __enter__(self) -> "StreamSession":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- wire side -----------------------------------------------------------------------

    def _requests(self, generation: int) -> Iterator[Any]:
        with self._cond:
            resend = [p for p in self._inflight.values()]
            now = time.perf_counter()
            for p in resend:
                p.sent = now
        for p in resend:
            yield to_request(p.frame, self._options, self._config.deadline_ms)
        while True:
            with self._cond:
                while not self._queue and not self._closed and generation == self._generation:
                    self._cond.wait(0.2)
                if generation != self._generation or self._error is not None:
                    return
                if not self._queue:
                    return  # closed and drained: half-close, the server answers the rest
                frame = self._queue.popleft()
                self._inflight[(frame.camera_id, frame.sequence)] = _Pending(frame, time.perf_counter())
            yield to_request(frame, self._options, self._config.deadline_ms)

    def _finished_locked(self) -> bool:
        return self._closed and not self._queue and not self._inflight

    def _give_up_locked(self) -> None:
        self.lost.extend(p.frame for p in self._inflight.values())
        self.lost.extend(self._queue)
        self._inflight.clear()
        self._queue.clear()
        self._free = self._config.window
        self._cond.notify_all()

    def _run(self) -> None:
        stub_cache: dict[str, Any] = {}
        while True:
            with self._cond:
                if self._error is not None or self._finished_locked():
                    return
                self._generation += 1
                generation = self._generation
                self._cancelled_by_us = False
            endpoint = self._pool.next()
            self.address = endpoint.address
            stub = stub_cache.get(endpoint.address)
            if stub is None:
                stub = stub_cache[endpoint.address] = detector_pb2_grpc.DetectorStub(endpoint.channel)
            failure: PerceptionError | None = None
            retry = True
            try:
                call = stub.StreamDetect(self._requests(generation), metadata=self._config.metadata())
                with self._cond:
                    self._call = call
                for resp in call:
                    self._handle(resp)
                with self._cond:
                    if self._finished_locked():
                        return
                failure = NotReadyError(f"server {endpoint.address} ended the stream with frames unanswered")
            except grpc.RpcError as exc:
                failure = translate(exc, endpoint.address)
                retry = is_retryable(exc.code()) or self._cancelled_by_us
            finally:
                with self._cond:
                    self._call = None
                    self._generation += 1  # stop this call's request iterator
                    self._cond.notify_all()
            with self._cond:
                if self._error is not None:
                    return
            delay = self._backoff.next_delay() if retry else None
            if delay is None:
                log.error("%s: giving up: %s", self.name, failure)
                with self._cond:
                    self._error = failure
                    self._give_up_locked()
                return
            self.reconnects += 1
            # The first failure of a streak is news; the retries that follow are not.
            level = logging.WARNING if self._backoff.attempts == 1 else logging.INFO
            log.log(level, "%s: %s; reconnecting in %.2fs", self.name, failure, delay)
            time.sleep(delay)

    def _handle(self, resp: Any) -> None:
        key = (resp.camera_id, int(resp.sequence))
        now = time.perf_counter()
        with self._cond:
            pending = self._inflight.pop(key, None)
            if pending is None:
                log.debug("%s: ignoring an answer to %s that is not in flight (a re-sent duplicate)", self.name, key)
                return
            self._free += 1
            self._cond.notify_all()
        if self._backoff.attempts:
            log.info("%s: reconnected to %s", self.name, self.address)
            self._backoff.reset()
        result = from_response(resp, latency_ms=(now - pending.sent) * 1e3)
        try:
            self._on_result(pending.frame, result)
        except Exception as exc:  # the caller's callback must not kill the receiver thread
            log.exception("%s: on_result failed", self.name)
            self.callback_error = self.callback_error or exc

    def _watch(self) -> None:
        timeout = self._config.response_timeout_s
        while not self._stop_watchdog.wait(min(0.5, timeout / 4)):
            with self._cond:
                if not self._inflight or self._call is None:
                    continue
                oldest = next(iter(self._inflight.values())).sent
                if time.perf_counter() - oldest <= timeout:
                    continue
                call = self._call
                self._cancelled_by_us = True
            log.warning("%s: no answer for %.1fs; dropping the connection", self.name, timeout)
            call.cancel()
