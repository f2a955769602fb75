"""Property-based fuzzing of the request path against a real server on loopback: 10,000
generated requests (random fields, truncated and mutated JPEG/PNG bytes, random raw sizes,
strides and formats). Every call must be answered, OK / INVALID / an explicit status or one of
the documented codes; never INTERNAL (a crash) and never a hang; the server is healthy after."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import cv2
import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perception.v1 import detector_pb2 as pb
from tests.server.conftest import health_check

EXAMPLES = 10_000
ALLOWED_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
    prog = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    png = cv2.imencode(".png", img)[1].tobytes()
    return [jpg, prog, png]


SEEDS = _seeds()


@st.composite
def encoded(draw: Any) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    how = draw(st.sampled_from(["keep", "truncate", "flip", "splice", "eoi", "header"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif how == "splice":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(max_size=64))
    elif how == "eoi":
        data = data[: draw(st.integers(2, len(data)))] + b"\xff\xd9"
    elif how == "header":
        i = draw(st.integers(0, min(len(data) - 4, 300)))
        data[i:i + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(data)


@st.composite
def raw(draw: Any) -> pb.RawImage:
    w, h = draw(st.integers(0, 80)), draw(st.integers(0, 60))
    fmt = draw(st.integers(0, 6))
    stride = draw(st.sampled_from([0, w * 3, w * 3 + 16, w, draw(st.integers(0, 1 << 20))]))
    size = draw(st.sampled_from([w * h * 3, w * h, (w * h * 3) // 2, draw(st.integers(0, 20_000))]))
    return pb.RawImage(width=w, height=h, row_stride=stride, format=fmt, data=bytes(size))


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def requests(draw: Any) -> pb.DetectRequest:
    frame = pb.Frame(camera_id=draw(st.text(max_size=140)), sequence=draw(st.integers(0, 2**64 - 1)),
                     capture_timestamp_ns=draw(st.integers(-(2**63), 2**63 - 1)),
                     deadline_ms=draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["encoded", "raw", "none"]))
    if kind == "encoded":
        frame.encoded = draw(encoded())
    elif kind == "raw":
        frame.raw.CopyFrom(draw(raw()))
    if draw(st.booleans()):  # half sane options, so that the decode and inference paths run too
        opts = pb.DetectOptions(score_threshold=draw(st.floats(0, 1)), class_agnostic_nms=draw(st.booleans()))
    else:
        opts = pb.DetectOptions(score_threshold=draw(floats), iou_threshold=draw(floats),
                                max_detections=draw(st.integers(0, 2**32 - 1)),
                                class_filter=draw(st.lists(st.integers(0, 2**32 - 1), max_size=12)),
                                class_agnostic_nms=draw(st.booleans()))
    return pb.DetectRequest(frame=frame, options=opts)


def test_fuzzed_requests_never_crash_the_server(serve: Any) -> None:
    # The backoff after unservable frames is off: this test is about the parser, and most
    # fuzzed frames are unservable (the backoff has its own test in test_hostile).
    run = serve(max_message_bytes=64 << 20, invalid_backoff_max_s=0)
    seen: Counter[str] = Counter()
    t0 = time.perf_counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def one(req: pb.DetectRequest) -> None:
        try:
            resp = run.stub.Detect(req, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() in ALLOWED_CODES, (exc.code(), exc.details())
            seen[exc.code().name] += 1
            return
        assert resp.status in (pb.FRAME_STATUS_OK, pb.FRAME_STATUS_EXPIRED), resp
        seen[pb.FrameStatus.Name(resp.status)] += 1

    one()
    elapsed = time.perf_counter() - t0
    assert sum(seen.values()) == EXAMPLES, seen
    assert seen["INVALID_ARGUMENT"] > 1000 and seen["FRAME_STATUS_OK"] > 100, seen  # both paths exercised
    assert elapsed < 180, elapsed
    check = health_check(run.channel)
    assert check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING
    assert run.server.scheduler.pending == 0 and run.server.scheduler.queue_count == 0
