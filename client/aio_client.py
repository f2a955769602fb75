"""The asyncio client: the same Detect / GetModelInfo / StreamDetect-with-window-and-reconnect
behaviour as detector_client + stream, on grpc.aio, for camera nodes written with asyncio.

    async with AsyncDetectorClient(config) as client:
        async with client.stream(on_result) as s:
            async for frame in camera:
                await s.send(frame)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from client.backoff import Backoff
from client.channels import ChannelPool
from client.config import ClientConfig
from client.convert import RequestOptions, from_response, to_request
from client.detector_client import ModelInfo, model_info_from_pb
from client.errors import is_retryable, translate
from client.frames import FrameResult, SourceFrame
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
            endpoint = self.pool.next()
            stub = detector_pb2_grpc.DetectorStub(endpoint.channel)
            try:
                return await getattr(stub, method)(request, timeout=timeout, metadata=self.config.metadata())
            except grpc.aio.AioRpcError as exc:
                err = translate(exc, endpoint.address)
                if not is_retryable(exc.code()) or exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise err from exc
                delay = backoff.next_delay()
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
        return model_info_from_pb(await self._unary("GetModelInfo", pb.GetModelInfoRequest(), self.config.rpc_timeout_s))

    def stream(
        self, on_result: AsyncResultCallback, options: RequestOptions | None = None, name: str = "stream"
    ) -> "AsyncStreamSession":
        return AsyncStreamSession(self.pool, self.config, on_result, options, name)

    async def close(self) -> None:
        await self.pool.aclose()

    async def __aenter__(self) -> "AsyncDetectorClient":
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()


class AsyncStreamSession:
    """asyncio twin of client.stream.StreamSession (same window, reconnect and re-send rules)."""

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
        self._queue: deque[SourceFrame] = deque()
        self._inflight: OrderedDict[tuple[str, int], list[Any]] = OrderedDict()  # key -> [frame, sent]
        self._free = config.window
        self._closed = False
        self._generation = 0
        self._error: PerceptionError | None = None
        self._backoff = Backoff(config.backoff)
        self.reconnects = 0
        self.lost: list[SourceFrame] = []
        self.address = ""
        self._call: Any = None
        self._cancelled_by_us = False
        self._task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
            self._watch_task = asyncio.ensure_future(self._watch())

    async def send(self, frame: SourceFrame) -> None:
        """Queue a frame, waiting while ``window`` frames are unanswered."""
        self._start()
        async with self._cond:
            await self._cond.wait_for(lambda: self._free > 0 or self._error is not None)
            if self._error is not None:
                raise self._error
            if self._closed:
                raise PerceptionError(f"{self.name}: send() after close()")
            self._free -= 1
            self._queue.append(frame)
            self._cond.notify_all()

    async def close(self, timeout: float | None = None) -> None:
        self._start()
        async with self._cond:
            self._closed = True
            self._cond.notify_all()
        assert self._task is not None and self._watch_task is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError as exc:
            await self.abort()
            raise NotReadyError(f"{self.name}: frames still unanswered after {timeout}s") from exc
        finally:
            self._watch_task.cancel()
        if self._error is not None:
            raise self._error

    async def abort(self) -> None:
        async with self._cond:
            self._closed = True
            if self._error is None:
                self._error = PerceptionError(f"{self.name}: aborted")
            self._give_up()
        if self._call is not None:
            self._call.cancel()
        for t in (self._task, self._watch_task):
            if t is not None:
                t.cancel()

    async def __aenter__(self) -> "AsyncStreamSession":
        self._start()
        return self

    async def __aexit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()

    def _give_up(self) -> None:
        self.lost.extend(f for f, _ in self._inflight.values())
        self.lost.extend(self._queue)
        self._inflight.clear()
        self._queue.clear()
        self._free = self._config.window
        self._cond.notify_all()

    def _finished(self) -> bool:
        return self._closed and not self._queue and not self._inflight

    async def _requests(self, generation: int) -> AsyncIterator[Any]:
        now = time.perf_counter()
        resend = list(self._inflight.values())
        for p in resend:
            p[1] = now
            yield to_request(p[0], self._options, self._config.deadline_ms)
        while True:
            async with self._cond:
                await self._cond.wait_for(
                    lambda: bool(self._queue) or self._closed or generation != self._generation or self._error is not None
                )
                if generation != self._generation or self._error is not None or not self._queue:
                    return
                frame = self._queue.popleft()
                self._inflight[(frame.camera_id, frame.sequence)] = [frame, time.perf_counter()]
            yield to_request(frame, self._options, self._config.deadline_ms)

    async def _run(self) -> None:
        while True:
            async with self._cond:
                if self._error is not None or self._finished():
                    return
                self._generation += 1
                generation = self._generation
                self._cancelled_by_us = False
            endpoint = self._pool.next()
            self.address = endpoint.address
            stub = detector_pb2_grpc.DetectorStub(endpoint.channel)
            retry = True
            try:
                self._call = stub.StreamDetect(self._requests(generation), metadata=self._config.metadata())
                async for resp in self._call:
                    await self._handle(resp)
                async with self._cond:
                    if self._finished():
                        return
                failure: PerceptionError = NotReadyError(f"server {endpoint.address} ended the stream with frames unanswered")
            except grpc.aio.AioRpcError as exc:
                failure = translate(exc, endpoint.address)
                retry = is_retryable(exc.code()) or self._cancelled_by_us
            except asyncio.CancelledError:
                # grpc.aio reports a call we cancelled (the watchdog) as a cancelled await.
                if not self._cancelled_by_us or self._error is not None:
                    raise
                failure = NotReadyError(f"server {endpoint.address} stopped answering")
            finally:
                self._call = None
                async with self._cond:
                    self._generation += 1
                    self._cond.notify_all()
            if self._error is not None:
                return
            delay = self._backoff.next_delay() if retry else None
            if delay is None:
                log.error("%s: giving up: %s", self.name, failure)
                async with self._cond:
                    self._error = failure
                    self._give_up()
                return
            self.reconnects += 1
            level = logging.WARNING if self._backoff.attempts == 1 else logging.INFO
            log.log(level, "%s: %s; reconnecting in %.2fs", self.name, failure, delay)
            await asyncio.sleep(delay)

    async def _handle(self, resp: Any) -> None:
        now = time.perf_counter()
        async with self._cond:
            pending = self._inflight.pop((resp.camera_id, int(resp.sequence)), None)
            if pending is None:
                return
            self._free += 1
            self._cond.notify_all()
        self._backoff.reset()
        out = self._on_result(pending[0], from_response(resp, latency_ms=(now - pending[1]) * 1e3))
        if asyncio.iscoroutine(out):
            await out

    async def _watch(self) -> None:
        timeout = self._config.response_timeout_s
        while True:
            await asyncio.sleep(min(0.5, timeout / 4))
            if self._inflight and self._call is not None:
                oldest = next(iter(self._inflight.values()))[1]
                if time.perf_counter() - oldest > timeout:
                    log.warning("%s: no answer for %.1fs; dropping the connection", self.name, timeout)
                    self._cancelled_by_us = True
                    self._call.cancel()
