"""The asyncio client: the same Detect / GetModelInfo / StreamDetect-with-window-and-reconnect
behaviour as detector_client + stream, on grpc.aio, for camera nodes written with asyncio.

    async with AsyncDetectorClient(config) as client:
        async with client.stream(on_result) as s:
            async for frame in camera:
                await s.send(frame)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from client.backoff import Backoff
from client.channels import ChannelPool
from client.client_status import is_drain_refusal
from client.config import ClientConfig
from client.convert import RequestOptions, from_response, to_request
from client.detector_client import ModelInfo, model_info_from_pb
from client.errors import is_retryable, is_retryable_unary, translate
from client.frames import FrameResult, SourceFrame
from client.resend_window import Next, ResendWindow, WindowCounters
from perception.errors import NotReadyError, PerceptionError
from perception.v1 import detector_pb2 as pb
from perception.v1 import detector_pb2_grpc

log = logging.getLogger(__name__)

AsyncResultCallback = Callable[[SourceFrame, FrameResult], Awaitable[None] | None]


class AsyncDetectorClient:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.pool = ChannelPool(config, aio=True)

    async def _unary(self, method: str, request: Any, timeout: float) -> Any:
        backoff = Backoff(self.config.backoff)
        while True:
            endpoint = await self.pool.anext()
            stub = detector_pb2_grpc.DetectorStub(endpoint.channel)
            try:
                return await getattr(stub, method)(request, timeout=timeout, metadata=self.config.metadata())
            except grpc.aio.AioRpcError as exc:
                err = translate(exc, endpoint.address)
                delay = backoff.next_delay(time.monotonic()) if is_retryable_unary(exc.code(), exc.details()) else None
                if delay is None:
                    raise err from exc
                log.warning("%s; retrying in %.2fs", err, delay)
                await asyncio.sleep(delay)

    async def detect(self, frame: SourceFrame, options: RequestOptions | None = None) -> FrameResult:
        timeout = self.config.rpc_timeout_s + self.config.deadline_ms / 1e3
        t0 = time.perf_counter()
        resp = await self._unary("Detect", to_request(frame, options, self.config.deadline_ms), timeout)
        return from_response(resp, latency_ms=(time.perf_counter() - t0) * 1e3)

    async def model_info(self) -> ModelInfo:
        resp = await self._unary("GetModelInfo", pb.GetModelInfoRequest(), self.config.rpc_timeout_s)
        return model_info_from_pb(resp)

    def stream(
        self, on_result: AsyncResultCallback, options: RequestOptions | None = None, name: str = "stream"
    ) -> AsyncStreamSession:
        return AsyncStreamSession(self.pool, self.config, on_result, options, name)

    async def close(self) -> None:
        await self.pool.aclose()

    async def __aenter__(self) -> AsyncDetectorClient:
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()


class AsyncStreamSession(WindowCounters):
    """asyncio twin of client.stream.StreamSession: the same window, reconnect and re-send
    rules (``resend_window.ResendWindow``) on grpc.aio, and the same lazy call (opened at the
    first frame, closed after ``config.idle_close_s`` with nothing in flight). Unlike the sync
    session, an exception raised by ``on_result`` ends the session and comes out of ``close()``."""

    def __init__(
        self, pool: ChannelPool, config: ClientConfig, on_result: AsyncResultCallback,
        options: RequestOptions | None, name: str,
    ) -> None:
        self._pool = pool
        self._config = config
        self._on_result = on_result
        self._options = options
        self.name = name
        self._cond = asyncio.Condition()
        self._window = ResendWindow(config.window, Backoff(config.backoff), name)
        self.address = ""
        self._call: Any = None
        self._cancelled_by_us = False
        self._task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        """Accepted frames not answered yet."""
        return self._window.in_flight

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
            self._watch_task = asyncio.ensure_future(self._watch())

    async def send(self, frame: SourceFrame) -> None:
        """Queue a frame, waiting while ``window`` frames are unanswered."""
        self._start()
        async with self._cond:
            await self._cond.wait_for(lambda: self._window.can_accept)
            self._window.accept(frame)
            self._cond.notify_all()

    async def close(self, timeout: float | None = None) -> None:
        """No more frames: wait until every accepted frame is answered (or the session gives
        up, which raises)."""
        self._start()
        async with self._cond:
            self._window.close()
            self._cond.notify_all()
        if self._task is None or self._watch_task is None:
            raise RuntimeError(f"{self.name}: session tasks were not started")
        try:
            # asyncio.wait, not wait_for(shield(task)): a task that ``abort`` cancelled is done,
            # not a CancelledError out of close() (which ``except Exception`` does not catch, and
            # which reads as the caller's own cancellation); the session's error follows.
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                late = NotReadyError(f"{self.name}: frames still unanswered after {timeout}s")
                await self.abort(late)
                raise late
            failed = None if self._task.cancelled() else self._task.exception()
            if failed is not None:
                raise failed
        finally:
            self._watch_task.cancel()
        if self._window.error is not None:
            raise self._window.error

    async def abort(self, reason: PerceptionError | None = None) -> None:
        """Stop now; unanswered frames go to ``lost`` and ``reason`` (default: "aborted")
        becomes the session's error, unless it already had one."""
        async with self._cond:
            self._window.abort(reason or PerceptionError(f"{self.name}: aborted"))
            self._cond.notify_all()
        if self._call is not None:
            self._call.cancel()
        for t in (self._task, self._watch_task):
            if t is not None:
                t.cancel()

    async def __aenter__(self) -> AsyncStreamSession:
        self._start()
        return self

    async def __aexit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()

    async def _requests(self, generation: int) -> AsyncIterator[Any]:
        for frame in self._window.resend(time.perf_counter()):
            yield to_request(frame, self._options, self._config.deadline_ms, resent=True)
        while True:
            async with self._cond:
                while not self._window.has_work(generation):
                    if self._window.close_if_idle(generation, time.perf_counter(), self._config.idle_close_s):
                        log.debug("%s: nothing to send for %gs; closing the stream", self.name,
                                  self._config.idle_close_s)
                        return  # the half-close: the server answers what it has and ends the call
                    with contextlib.suppress(asyncio.TimeoutError):  # look at the clock again
                        await asyncio.wait_for(self._cond.wait(), 0.2)
                next_frame = self._window.take(generation, time.perf_counter())
            if next_frame is None:
                return
            yield to_request(next_frame, self._options, self._config.deadline_ms)

    async def _run(self) -> None:
        while True:
            async with self._cond:
                # Nothing to send: hold none of the server's stream slots (see stream.py).
                await self._cond.wait_for(lambda: self._window.wants_connection)
                generation = self._window.begin_connection()
                if generation is None:
                    return
                self._cancelled_by_us = False
            try:
                endpoint = await self._pool.anext()
            except Exception as exc:  # the client was closed (or its first lookup failed): end the
                # session, so that a sender waiting for room in the window raises instead of waiting for ever
                async with self._cond:
                    self._window.abort(PerceptionError(f"{self.name}: no server to stream to ({exc})"))
                    self._window.end_connection()
                    self._cond.notify_all()
                raise
            self.address = endpoint.address
            stub = detector_pb2_grpc.DetectorStub(endpoint.channel)
            failure: PerceptionError | None = None
            retry = True
            try:
                self._call = stub.StreamDetect(self._requests(generation), metadata=self._config.metadata())
                async for resp in self._call:
                    await self._handle(resp)
                async with self._cond:
                    if self._window.finished:
                        return
                    quiet = self._window.ended_quietly
                if not quiet:
                    failure = NotReadyError(f"server {endpoint.address} ended the stream with frames unanswered")
            except grpc.aio.AioRpcError as exc:
                failure = translate(exc, endpoint.address)
                retry = is_retryable(exc.code(), exc.details()) or self._cancelled_by_us
            except asyncio.CancelledError:
                # grpc.aio reports a call we cancelled (the watchdog) as a cancelled await.
                if not self._cancelled_by_us or self._window.error is not None:
                    raise
                failure = NotReadyError(f"server {endpoint.address} stopped answering")
            except Exception as exc:
                # on_result failed (e.g. a full disk): end the session with that error, so that a
                # sender waiting for room in the window raises instead of waiting for ever.
                async with self._cond:
                    self._window.abort(PerceptionError(
                        f"{self.name}: handling an answer failed ({type(exc).__name__}: {exc})"))
                    self._cond.notify_all()
                if self._call is not None:
                    self._call.cancel()
                raise
            finally:
                self._call = None
                async with self._cond:
                    self._window.end_connection()
                    self._cond.notify_all()
            if failure is None:  # closed by us, quiet: the next frame opens the next call
                continue
            async with self._cond:
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
            await asyncio.sleep(decision.delay_s)

    async def _handle(self, resp: Any) -> None:
        now = time.perf_counter()
        result = from_response(resp)
        if is_drain_refusal(result):
            # Not an answer: re-sent after the reconnect (see stream.StreamSession._handle).
            async with self._cond:
                refused = self._window.refuse(result.camera_id, result.sequence, result.message)
            if refused is not None:
                log.info("%s: frame %s refused by draining server %s; it will be re-sent", self.name,
                         (result.camera_id, result.sequence), self.address)
            return
        async with self._cond:
            answered = self._window.answer(result.camera_id, result.sequence, now)
            if answered is None:
                return  # a duplicate answer to a re-sent frame
            self._cond.notify_all()
        if answered.reconnected:
            log.info("%s: reconnected to %s", self.name, self.address)
        out = self._on_result(answered.frame, dataclasses.replace(result, latency_ms=answered.latency_ms))
        if asyncio.iscoroutine(out):
            await out

    async def _watch(self) -> None:
        timeout = self._config.response_timeout_s
        while True:
            await asyncio.sleep(min(0.5, timeout / 4))
            if self._call is not None and self._window.stalled(time.perf_counter(), timeout):
                log.warning("%s: no answer for %.1fs; dropping the connection", self.name, timeout)
                self._cancelled_by_us = True
                self._call.cancel()
