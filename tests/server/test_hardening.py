"""Limits found missing by a review, each against a real server on loopback: a client that stops
reading its answers, unary Detect calls that would take every handler thread, a stream that
invents camera ids, and a JPEG of one scan per component."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from perception.v1 import detector_pb2 as pb
from perception.v1 import detector_pb2_grpc as pb_grpc
from tests.server.conftest import (
    health_check,
    jpeg,
    lockstep_with_a_slow_decode,
    occupy_the_decoder,
    request,
    stalled_reader_channel,
    wait_for,
    window_filling_request,
)

OK = pb.FRAME_STATUS_OK
INVALID = pb.FRAME_STATUS_INVALID



def test_a_client_that_stops_reading_loses_its_stream_after_the_idle_timeout(serve: Any) -> None:
    """Once the client's HTTP/2 window is full, the server's send blocks inside gRPC, where the
    stream's idle check never ran: the stream's slot, its handler thread and its own threads
    were held until the connection aged out (30 min by default). The stream's send watchdog
    cancels the call when no answer could be sent for the idle timeout."""
    run = serve(stream_idle_timeout_s=1.0, outbox_size=4, queue_size=1, invalid_backoff_max_s=0)
    channel = stalled_reader_channel(run.address)
    stub = pb_grpc.DetectorStub(channel)
    stop = threading.Event()

    def reqs() -> Iterator[pb.DetectRequest]:
        for i in range(300):
            if stop.is_set():
                return
            yield window_filling_request("front", i)
        stop.wait(30)

    streams = run.server.limits.streams
    earlier = {t for t in threading.enumerate() if t.name.startswith("stream-")}  # other tests' streams
    call = stub.StreamDetect(reqs(), timeout=30)  # never read
    try:
        assert wait_for(lambda: streams.open_streams == 1, 5)
        t0 = time.monotonic()
        assert wait_for(lambda: streams.open_streams == 0, 8), "the stream still holds its slot"
        assert time.monotonic() - t0 < 8
        # ... and the stream's own threads (reader, pre-processor, watchdog) are gone.
        assert wait_for(lambda: not [t for t in threading.enumerate()
                                      if t.name.startswith("stream-") and t not in earlier], 5)
        check = health_check(run.channel)
        assert check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING
        assert run.stub.Detect(request("front", 1, jpeg()), timeout=10).status == OK
    finally:
        stop.set()
        call.cancel()
        channel.close()


def test_a_slow_reader_keeps_its_stream(serve: Any) -> None:
    """The watchdog counts only time an answer could not be sent: a client that reads, slowly,
    and a stream whose next answer the server itself takes longer than the timeout to make
    (its frame waits for a decode slot: the stream is not idle, a frame is in flight) are not
    cut. A watchdog that kept counting from the last answer sent cut the second case; so did the
    idle check, which counted the quiet from the client's last frame, so that a lockstep client
    whose answer took longer than the timeout was ended as idle the moment it got it."""
    run = serve(stream_idle_timeout_s=1.0, decode_threads=1)
    requests, turn, held = lockstep_with_a_slow_decode(run.server.limits, lambda i: request("front", i, jpeg()))
    got = []
    for answer in run.stub.StreamDetect(requests, timeout=30):
        got.append(answer.status)
        time.sleep(0.6)  # reads each answer late, but well within the timeout
        turn.release()
    assert got == [OK] * 4 and held and held[0].is_set()


def test_slow_unary_calls_cannot_take_every_handler_thread(serve: Any) -> None:
    """Unary Detect had no cap of its own: with decodes slow, enough concurrent calls held
    every thread of the pool that health checks are served from. Now one past
    max_unary_detect_calls is refused RESOURCE_EXHAUSTED at once, and health answers."""
    from server.config import ServerConfig

    run = serve(decode_threads=1, max_workers=16)
    cap = ServerConfig(model="m.json", max_workers=16).unary_detect_limit()
    assert cap == 12 == run.server.limits.unary_detect.limit
    hold = occupy_the_decoder(run.server.limits)
    codes: list[str] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        try:
            status = run.stub.Detect(request("front", i, jpeg()), timeout=20).status
            code = "OK" if status == OK else str(status)
        except grpc.RpcError as exc:
            code = exc.code().name
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(cap)]
    try:
        for t in threads:
            t.start()
        # Every call waits for a decode slot (DecodeSlots' waiters), each on a handler thread.
        assert wait_for(lambda: len(run.server.limits.decode._waiting) == cap, 10)
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            run.stub.Detect(request("front", 99, jpeg()), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert f"max {cap}" in (err.value.details() or "")
        assert time.perf_counter() - t0 < 1.0  # refused at once, not queued
        check = health_check(run.channel)
        assert check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        hold.set()
        for t in threads:
            t.join(30)
    assert codes == ["OK"] * cap
    assert run.server.limits.unary_detect.in_use == 0
    assert run.stub.Detect(request("front", 100, jpeg()), timeout=10).status == OK


def test_the_unary_call_cap_is_below_the_handler_threads(tiny_manifest: Any) -> None:
    from perception.errors import ConfigError
    from server.config import ServerConfig

    def limit(**kw: Any) -> int:
        return ServerConfig(model=str(tiny_manifest), **kw).unary_detect_limit()

    assert (limit(), limit(max_workers=4), limit(max_workers=1), limit(max_unary_detect_calls=3)) == (12, 3, 1, 3)
    for bad in (16, 17, -1):
        with pytest.raises(ConfigError, match="max_unary_detect_calls"):
            ServerConfig(model=str(tiny_manifest), max_unary_detect_calls=bad)


def test_unary_decode_fairness_is_by_client_host_not_connection(serve: Any) -> None:
    """A new connection per call has a new port: keyed on the peer with its port, each call
    was a new owner that had used no decode time, ahead of every stream."""
    run = serve()
    for _ in range(2):
        with grpc.insecure_channel(run.address) as channel:  # a new connection, a new client port
            assert pb_grpc.DetectorStub(channel).Detect(request("front", 1, jpeg()), timeout=10).status == OK
    owners = [k for k in run.server.limits.decode._cost if isinstance(k, tuple) and k[0] == "unary"]
    assert owners == [("unary", "127.0.0.1")], owners


def test_a_stream_carries_a_bounded_number_of_cameras(serve: Any) -> None:
    """A stream remembers every camera id it carried (to close their scheduler queues when it
    ends): a client inventing ids grew that set for the stream's whole life. Past the cap a new
    camera's frame is answered INVALID; the cameras it has keep being served."""
    from server.limits import DEFAULT_MAX_STREAM_CAMERAS

    run = serve(invalid_backoff_max_s=0)
    assert run.server.limits.max_stream_cameras == DEFAULT_MAX_STREAM_CAMERAS
    cameras = [f"cam{i}" for i in range(DEFAULT_MAX_STREAM_CAMERAS)]
    frame = jpeg()
    reqs = [request(c, i, frame) for i, c in enumerate(cameras)]
    reqs += [request("one-too-many", 1000, frame), request("cam0", 1001, frame), request("one-too-many", 1002, frame)]
    turn = threading.Semaphore(1)

    def lockstep() -> Iterator[pb.DetectRequest]:
        for r in reqs:
            turn.acquire()
            yield r

    out = []
    for answer in run.stub.StreamDetect(lockstep(), timeout=60):
        out.append(answer)
        turn.release()
    assert [a.status for a in out[:-3]] == [OK] * len(cameras)
    assert [a.status for a in out[-3:]] == [INVALID, OK, INVALID], [a.message for a in out[-3:]]
    assert f"carried {DEFAULT_MAX_STREAM_CAMERAS} cameras" in out[-3].message and "'one-too-many'" in out[-3].message


def test_a_jpeg_of_one_scan_per_component_is_refused_from_its_header(serve: Any) -> None:
    """A 0.1 MB 3840x2160 baseline JPEG whose three scans hold one component each makes libjpeg
    keep every coefficient of the image, as a progressive one does; the server took it as a
    baseline JPEG for reduced-scale decoding. Its interleaved twin is still decoded."""
    from tests.perception.test_decode import flat_jpeg

    run = serve(max_full_buffer_pixels=1920 * 1080)
    separate = flat_jpeg(3840, 2160, interleaved=False)
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Detect(request("front", 0, separate), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "non-interleaved JPEG 3840x2160 needs a full-size decode buffer" in (err.value.details() or "")
    assert run.stub.Detect(request("front", 1, flat_jpeg(3840, 2160, interleaved=True)), timeout=10).status == OK


def test_the_unary_call_cap_follows_the_config(serve: Any) -> None:
    """--max-unary-detect-calls (and the default, max workers less a quarter) reach the
    server's limits: the setting was parsed but the server kept 12 whatever it said."""
    assert serve(max_workers=8, max_unary_detect_calls=3).server.limits.unary_detect.limit == 3
    assert serve(max_workers=8).server.limits.unary_detect.limit == 6
