"""Fixtures for server tests: a real server on a free loopback port, real frames."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from perception.v1 import detector_pb2 as pb
from perception.v1 import detector_pb2_grpc as pb_grpc
from server.app import ManagedServer, create_server
from server.config import ServerConfig


def jpeg(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    """A real JPEG of a random scene with a few filled rectangles."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 90, np.uint8)
    for _ in range(4):
        x, y = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.rectangle(img, (x, y), (x + width // 4, y + height // 4), colour, -1)
    noisy = cv2.add(img, rng.integers(0, 30, img.shape, dtype=np.uint8))
    ok, buf = cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buf.tobytes()


def request(camera: str, seq: int, data: bytes | None = None, **frame_kw: Any) -> pb.DetectRequest:
    frame = pb.Frame(camera_id=camera, sequence=seq, capture_timestamp_ns=1_000_000 * seq, **frame_kw)
    if data is not None:
        frame.encoded = data
    return pb.DetectRequest(frame=frame)


def health_check(
    channel: grpc.Channel,
) -> grpc.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]:
    """``HealthStub(channel).Check``, typed."""
    stub = health_pb2_grpc.HealthStub(channel)
    check: grpc.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]
    check = stub.Check  # type: ignore[attr-defined]  # generated stub: types-grpcio-health-checking omits its RPCs
    return check


@dataclasses.dataclass
class Running:
    server: ManagedServer
    port: int
    registry: CollectorRegistry
    own_channel: grpc.Channel | None  # None when started with channel=False
    own_stub: pb_grpc.DetectorStub | None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def channel(self) -> grpc.Channel:
        assert self.own_channel is not None, "this server was started with channel=False"
        return self.own_channel

    @property
    def stub(self) -> pb_grpc.DetectorStub:
        assert self.own_stub is not None, "this server was started with channel=False"
        return self.own_stub



def occupy_the_decoder(limits: Any) -> threading.Event:
    """Take the server's decode slot (one with ``decode_threads=1``) until the returned Event is
    set: every frame, and every Detect call, then waits undecoded in the server, holding its
    handler thread, as on a busy server."""
    hold, holding = threading.Event(), threading.Event()

    def occupy() -> None:
        with limits.decode.slot():
            holding.set()
            hold.wait(20)

    threading.Thread(target=occupy, daemon=True).start()
    assert holding.wait(5)
    return hold


def lockstep_with_a_slow_decode(limits: Any, make: Callable[[int], Any]
                                 ) -> tuple[Iterator[Any], threading.Semaphore, list[threading.Event]]:
    """Four requests ``make(i)`` sent in lockstep (release the semaphore at each answer), the
    third one waiting 1.5 s in the server for the decode slot (``decode_threads=1``); the list
    holds that slot's Event once it was taken."""
    turn = threading.Semaphore(1)
    held: list[threading.Event] = []

    def lockstep() -> Iterator[Any]:
        for i in range(4):
            turn.acquire()
            if i == 2:
                held.append(occupy_the_decoder(limits))
                threading.Timer(1.5, held[0].set).start()
            yield make(i)

    return lockstep(), turn, held


def stalled_reader_channel(address: str) -> grpc.Channel:
    """A channel with a tiny receive window and no window growth: once its client stops
    reading, HTTP/2 flow control makes the server's sends block."""
    return grpc.insecure_channel(address, options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)])


def window_filling_request(camera: str, seq: int) -> pb.DetectRequest:
    """A raw 320x240 frame of noise asking for up to 100 boxes at a 0.01 threshold: big answers,
    that fill a stalled reader's window fast."""
    raw = pb.RawImage(width=320, height=240, format=pb.PIXEL_FORMAT_BGR8,
                      data=np.random.default_rng(0).integers(0, 255, 320 * 240 * 3, dtype=np.uint8).tobytes())
    return pb.DetectRequest(frame=pb.Frame(camera_id=camera, sequence=seq, raw=raw),
                            options=pb.DetectOptions(score_threshold=0.01, max_detections=100))

@pytest.fixture
def serve(tiny_manifest: Path) -> Iterator[Callable[..., Running]]:
    """serve(**config_overrides) -> Running; everything started is stopped after the test."""
    started: list[Running] = []

    def start(channel: bool = True, **overrides: Any) -> Running:
        kw: dict[str, Any] = dict(model=str(tiny_manifest), host="127.0.0.1", port=0, metrics_port=0,
                                  threads=1, warmup_iters=1, grace_s=2.0)
        kw.update(overrides)
        registry = CollectorRegistry()
        server, port = create_server(ServerConfig(**kw), registry)
        ch = grpc.insecure_channel(f"127.0.0.1:{port}") if channel else None
        run = Running(server, port, registry, ch, pb_grpc.DetectorStub(ch) if ch else None)
        started.append(run)
        return run

    yield start
    for run in started:
        if run.own_channel is not None:
            run.own_channel.close()
        run.server.shutdown(1.0)


def wait_for(predicate: Any, timeout_s: float = 10.0) -> bool:
    """Whether ``predicate()`` became true within ``timeout_s`` (polled every 20 ms)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())
