"""The synchronous client: unary Detect, GetModelInfo, and StreamDetect sessions.

    config = ClientConfig(targets=("10.0.0.2:50051",), token="...", window=4, deadline_ms=200)
    with DetectorClient(config) as client:
        result = client.detect(frame)
        with client.stream(on_result=print) as s:
            for frame in frames:
                s.send(frame)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from client.backoff import Backoff
from client.channels import ChannelPool
from client.config import ClientConfig
from client.convert import RequestOptions, from_response, to_request
from client.errors import is_retryable_unary, translate
from client.frames import FrameResult, SourceFrame
from client.stream import ResultCallback, StreamSession
from perception.errors import NotReadyError
from perception.v1 import detector_pb2 as pb
from perception.v1 import detector_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What GetModelInfo reports about the served model."""

    name: str
    version: str
    classes: tuple[str, ...]
    input_width: int
    input_height: int
    precision: str
    backend: str
    variant: str
    macs: int
    params: int
    max_batch: int
    kpi: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    max_message_bytes: int = 0  # the largest request the server reads (0: not reported)


def model_info_from_pb(msg: pb.ModelInfo) -> ModelInfo:
    try:
        manifest = json.loads(msg.manifest_json) if msg.manifest_json else {}
    except ValueError:
        manifest = {}
    return ModelInfo(
        name=msg.name,
        version=msg.version,
        classes=tuple(msg.classes),
        input_width=msg.input_width,
        input_height=msg.input_height,
        precision=msg.precision,
        backend=msg.backend,
        variant=msg.variant,
        macs=int(msg.macs),
        params=int(msg.params),
        max_batch=int(msg.max_batch),
        kpi={m.name: float(m.value) for m in msg.kpi},
        manifest=manifest,
        max_message_bytes=int(msg.max_message_bytes),
    )


class DetectorClient:
    """Talks to one or more detector servers (round-robin); thread-safe."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.pool = ChannelPool(config)

    def _unary(self, method: str, request: Any, timeout: float, retry: bool = True) -> Any:
        """Call ``method``, moving to the next server with backoff on retryable failures
        (without ``retry``: once, raising its error)."""
        backoff = Backoff(self.config.backoff)
        while True:
            endpoint = self.pool.next()
            stub = detector_pb2_grpc.DetectorStub(endpoint.channel)
            try:
                return getattr(stub, method)(request, timeout=timeout, metadata=self.config.metadata())
            except grpc.RpcError as exc:
                err = translate(exc, endpoint.address)
                retryable = retry and is_retryable_unary(exc.code(), exc.details())
                delay = backoff.next_delay(time.monotonic()) if retryable else None
                if delay is None:
                    raise err from exc
                log.warning("%s; retrying in %.2fs", err, delay)
                time.sleep(delay)

    def detect(self, frame: SourceFrame, options: RequestOptions | None = None) -> FrameResult:
        """Detect on one frame. Raises InvalidInputError for a frame the server rejects,
        NotReadyError when no server answers."""
        timeout = self.config.rpc_timeout_s + self.config.deadline_ms / 1e3
        t0 = time.perf_counter()
        resp = self._unary("Detect", to_request(frame, options, self.config.deadline_ms), timeout)
        return from_response(resp, latency_ms=(time.perf_counter() - t0) * 1e3)

    def model_info(self, once: bool = False, timeout: float | None = None) -> ModelInfo:
        """What the server reports about its model. ``once``: one attempt, on the next server,
        no retries (a caller that must not wait on a server that is down); raises its error."""
        timeout = self.config.rpc_timeout_s if timeout is None else timeout
        return model_info_from_pb(self._unary("GetModelInfo", pb.GetModelInfoRequest(), timeout, retry=not once))

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until some server's channel is connected; raises NotReadyError on timeout."""
        timeout = self.config.connect_timeout_s if timeout is None else timeout
        end = time.monotonic() + timeout
        while True:
            for e in self.pool.endpoints:
                try:
                    grpc.channel_ready_future(e.channel).result(timeout=min(0.5, max(0.05, end - time.monotonic())))
                    return
                except grpc.FutureTimeoutError:
                    pass
            if time.monotonic() >= end:
                addrs = ", ".join(e.address for e in self.pool.endpoints)
                raise NotReadyError(f"no server reachable at {addrs} within {timeout:.0f}s")

    def stream(
        self, on_result: ResultCallback, options: RequestOptions | None = None, name: str = "stream"
    ) -> StreamSession:
        """Open a StreamDetect session (connects lazily, reconnects on its own)."""
        return StreamSession(self.pool, self.config, on_result, options, name=name)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> DetectorClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


__all__ = ["DetectorClient", "ModelInfo"]
