"""server.wire: the look at a DetectRequest's wire bytes before protobuf parses it."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError

from perception.v1 import detector_pb2 as pb
from server.config import ConfigError, ServerConfig
from server.wire import (
    MAX_FIELDS,
    MAX_INFER_REQUEST_FIELDS,
    MAX_OPTIONS_BYTES,
    MAX_REQUEST_FIELDS,
    Received,
    Refused,
    parse_detect_request,
)
from tests.server.conftest import jpeg, request

OK = pb.FRAME_STATUS_OK
INVALID = pb.FRAME_STATUS_INVALID


def _requests() -> list[pb.DetectRequest]:
    full = request("front", 7, jpeg(), deadline_ms=40)
    full.frame.capture_timestamp_ns = -5  # negative: a camera clock before the epoch
    full.options.class_filter.extend(range(80))
    full.options.score_threshold = 0.3
    full.options.track = True
    raw = pb.DetectRequest(frame=pb.Frame(camera_id="rear", sequence=2**63, raw=pb.RawImage(
        width=4, height=2, format=pb.PIXEL_FORMAT_BGR8, data=bytes(24))))
    shm = pb.DetectRequest(frame=pb.Frame(camera_id="cabin", shm=pb.SharedMemoryRef(
        segment="perception-1", offset=4096, byte_size=24, generation=2, width=4, height=2,
        format=pb.PIXEL_FORMAT_BGR8)))
    return [full, raw, shm, pb.DetectRequest(), pb.DetectRequest(frame=pb.Frame(camera_id="ünïcode"))]


def _whole(got: pb.DetectRequest | Received | Refused) -> pb.DetectRequest:
    """The request as protobuf would hold it, the image put back into a Received one."""
    assert not isinstance(got, Refused)
    if isinstance(got, pb.DetectRequest):
        return got
    whole = pb.DetectRequest()
    whole.CopyFrom(got.request)
    if got.kind == "encoded":
        assert not whole.frame.HasField("raw") and not whole.frame.HasField("shm")
        whole.frame.encoded = bytes(got.payload)
    else:
        assert got.kind == "raw" and whole.frame.raw.data == b""
        whole.frame.raw.data = bytes(got.payload)
    return whole


def _tricky() -> list[bytes]:
    """Wire bytes protobuf accepts that a frame's usual ones do not look like: fields repeated
    (last one wins, messages merge), the oneof set twice, unknown fields around the image."""
    a = request("front", 1, jpeg()).SerializeToString()
    b = pb.DetectRequest(frame=pb.Frame(camera_id="rear", sequence=9, raw=pb.RawImage(
        width=4, height=2, format=pb.PIXEL_FORMAT_BGR8, data=bytes(range(24))))).SerializeToString()
    raw_data_twice = pb.DetectRequest(frame=pb.Frame(raw=pb.RawImage(data=b"x" * 24))).SerializeToString()
    frame = pb.Frame(camera_id="side", encoded=b"\xff\xd8first").SerializeToString()
    unknown = b"\xa2\x06\x03abc"  # field 100, length-delimited: kept as an unknown field
    frame_with_unknowns = unknown + frame + unknown + pb.Frame(encoded=b"\xff\xd8second").SerializeToString()
    return [
        a + b,  # two frame fields: protobuf merges them, raw wins the oneof
        b + a,
        a + a,
        b"\x0a" + bytes([len(frame_with_unknowns)]) + frame_with_unknowns,
        b + raw_data_twice,
        pb.DetectRequest(frame=pb.Frame(encoded=b"")).SerializeToString(),
        pb.DetectRequest(frame=pb.Frame(raw=pb.RawImage(width=1))).SerializeToString(),
    ]


@pytest.mark.parametrize("index", range(5))
def test_camera_frames_parse_as_protobuf_parses_them(index: int) -> None:
    req = _requests()[index]
    data = req.SerializeToString()
    assert _whole(parse_detect_request(data)) == pb.DetectRequest.FromString(data)


@pytest.mark.parametrize("index", range(7))
def test_unusual_but_valid_wire_bytes_parse_as_protobuf_parses_them(index: int) -> None:
    data = _tricky()[index]
    assert _whole(parse_detect_request(data)) == pb.DetectRequest.FromString(data)


def test_a_frames_image_is_held_once_as_a_view_of_the_received_bytes() -> None:
    """protobuf would copy a 16 MiB image twice (parse, then field read); the deserializer's
    answer refers to gRPC's bytes instead."""
    data = request("front", 1, jpeg() + bytes(16 << 20)).SerializeToString()
    got = parse_detect_request(data)
    assert isinstance(got, Received) and got.kind == "encoded" and got.size == len(data)
    assert got.payload.obj is data and len(got.payload) > 16 << 20
    assert got.request.ByteSize() < 100  # the rest of the message: identity and options
    raw = pb.DetectRequest(frame=pb.Frame(raw=pb.RawImage(width=1920, height=1080, format=pb.PIXEL_FORMAT_BGR8,
                                                          data=bytes(1920 * 1080 * 3)))).SerializeToString()
    got = parse_detect_request(raw)
    assert isinstance(got, Received) and got.kind == "raw" and got.payload.obj is raw
    assert (got.request.frame.raw.width, got.request.frame.raw.height) == (1920, 1080)


def _flooded_options(n: int) -> bytes:
    req = request("front", 3, jpeg(), deadline_ms=25)
    req.frame.capture_timestamp_ns = 123
    req.options.class_filter.extend([0] * n)
    return req.SerializeToString()


def test_huge_options_are_refused_before_parsing_with_the_frame_identity_kept() -> None:
    data = _flooded_options(8_000_000)
    elapsed = float("inf")
    for _ in range(3):  # the least-disturbed of three: one preemption on a loaded machine is 5 ms
        t0 = time.perf_counter()
        got = parse_detect_request(data)
        elapsed = min(elapsed, time.perf_counter() - t0)
    assert isinstance(got, Refused) and got.ByteSize() == len(data)
    assert "options are 8000005 bytes" in got.reason and str(MAX_OPTIONS_BYTES) in got.reason
    f = got.request.frame
    assert (f.camera_id, f.sequence, f.capture_timestamp_ns, f.deadline_ms) == ("front", 3, 123, 25)
    assert not f.encoded, "the image is not copied into the refusal"
    assert elapsed < 0.005, f"{elapsed * 1e3:.1f} ms: the look must not scale with the entries"


@pytest.mark.parametrize("where", ["top level", "frame", "raw image", "options"])
def test_a_flood_of_fields_is_refused(where: str) -> None:
    flood = b"".join(bytes([(50 << 3) & 0x7F | 0x80, 50 >> 4, 1]) for _ in range(MAX_FIELDS + 1))  # field 50, varint 1

    def length_delimited(number: int, body: bytes) -> bytes:
        assert len(body) < 2**14
        n = len(body)
        return bytes([number << 3 | 2]) + (bytes([n]) if n < 128 else bytes([n & 0x7F | 0x80, n >> 7])) + body

    camera = length_delimited(1, b"front")
    if where == "top level":
        data = length_delimited(1, camera) + flood
    elif where == "frame":
        data = length_delimited(1, camera + flood)
    elif where == "raw image":
        data = length_delimited(1, camera + length_delimited(5, flood))
    else:
        data = length_delimited(1, camera) + length_delimited(2, flood)
    got = parse_detect_request(data)
    assert isinstance(got, Refused), got
    assert f"has more than {MAX_FIELDS} fields" in got.reason and where in got.reason
    assert got.request.frame.camera_id == "front"


def test_bytes_the_walk_cannot_read_are_refused_not_handed_to_protobuf() -> None:
    """Truncated or unreadable bytes come back Refused (answered INVALID), with the frame's
    identity as far as the walk read it; protobuf would refuse them too."""
    good = request("front", 1, jpeg()).SerializeToString()
    for bad in (good[:-10], b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0b"):
        with pytest.raises(DecodeError):
            pb.DetectRequest.FromString(bad)
        got = parse_detect_request(bad)
        assert isinstance(got, Refused) and "not a DetectRequest: its bytes cannot be read" in got.reason, got
        assert got.ByteSize() == len(bad)


def _field(number: int, body: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def _varints(number: int, n: int) -> bytes:
    """n occurrences of varint field ``number``, each holding 1."""
    return (_varint(number << 3) + b"\x01") * n


def _nested_detect_flood() -> bytes:
    """64 frames, each its identity and 62 raw images of 64 unknown varint fields: 774 KB that
    protobuf parses, and a walk allowed 64 fields per message visited all 258,000 of them."""
    frame = _field(1, b"front") + _varints(2, 1) + _field(5, _varints(50, 64)) * 62
    return _field(1, frame) * 64


def _nested_parameter_flood() -> bytes:
    """ModelInferRequest: 14 inputs of 63 parameters entries, each 63 occurrences of the entry's
    value (an InferParameter: protobuf merges them) of 64 bool_param varints. 6.95 MiB, 3.5
    million fields; the walk took 3.1 s over them."""
    entry = _field(2, _varints(1, 64)) * 63
    return _field(5, _field(4, entry) * 63) * 14


def _nested_contents_flood() -> bytes:
    """ModelInferRequest: 63 inputs of 62 contents occurrences, each 64 fp64_contents sent
    unpacked (one field per element, which protobuf accepts). 2.2 MiB, 0.18 s to walk."""
    contents = (_varint(7 << 3 | 1) + bytes(8)) * 64
    return _field(5, _field(5, contents) * 62) * 63


@pytest.mark.parametrize("flood", ["detect", "parameters", "contents"])
def test_nested_floods_are_refused_in_the_time_of_the_field_budget(flood: str) -> None:
    """Each message used to have its own MAX_FIELDS: 64 fields of 64 messages of 64 fields
    and so on, a walk of 64^3-64^4 fields, 0.18-3.1 s of pure Python per request, after which
    protobuf parsed them all. One budget for the whole request now refuses each after
    MAX_REQUEST_FIELDS (DetectRequest) or MAX_INFER_REQUEST_FIELDS (ModelInferRequest) fields,
    in 0.2-3 ms."""
    from perception.v1 import grpc_predict_v2_pb2 as kpb
    from server.wire import RefusedInfer, parse_model_infer_request

    if flood == "detect":
        data, parse, limit = _nested_detect_flood(), parse_detect_request, MAX_REQUEST_FIELDS
        assert pb.DetectRequest.FromString(data).frame.camera_id == "front"  # what protobuf would do
    else:
        data = _nested_parameter_flood() if flood == "parameters" else _nested_contents_flood()
        parse, limit = parse_model_infer_request, MAX_INFER_REQUEST_FIELDS
        assert len(kpb.ModelInferRequest.FromString(data).inputs) in (14, 63)  # what protobuf would do
    elapsed = float("inf")
    for _ in range(3):  # the least-disturbed of three, as above
        t0 = time.perf_counter()
        got = parse(data)
        elapsed = min(elapsed, time.perf_counter() - t0)
    assert isinstance(got, (Refused, RefusedInfer)), type(got)
    assert f"more than {limit} fields in all its messages, the field budget" in got.reason, got.reason
    if isinstance(got, Refused):
        assert (got.request.frame.camera_id, got.request.frame.sequence) == ("front", 1)
        assert got.ByteSize() == len(data)
    assert elapsed < 0.1, f"{elapsed * 1e3:.1f} ms: the walk must stop at the budget"


def test_an_honest_frame_with_options_and_a_class_filter_parses_within_the_budget() -> None:
    req = request("front", 11, jpeg(), deadline_ms=30)
    req.frame.capture_timestamp_ns = 1_700_000_000_000_000_000
    req.options.CopyFrom(pb.DetectOptions(score_threshold=0.25, iou_threshold=0.5, max_detections=300,
                                          class_filter=range(80), class_agnostic_nms=True, track=True))
    data = req.SerializeToString()
    got = parse_detect_request(data)
    assert isinstance(got, Received) and _whole(got) == req


def test_a_kserve_batch_at_the_largest_max_batch_parses_within_the_budget() -> None:
    """A BYTES batch sent in bytes_contents is one field per frame: 1024 of them (ServerConfig's
    largest max_batch, which a request may fill) with the parameters tritonclient sends."""
    from perception.v1 import grpc_predict_v2_pb2 as kpb
    from server.wire import parse_model_infer_request

    largest = 1024
    assert ServerConfig(model="manifest.json", max_batch=largest).max_batch == largest
    with pytest.raises(ConfigError, match="max_batch"):  # a larger one needs a larger MAX_INFER_REQUEST_FIELDS
        ServerConfig(model="manifest.json", max_batch=largest + 1)
    images = [jpeg(32, 24, seed) for seed in range(8)]
    req = kpb.ModelInferRequest(model_name="tiny", model_version="1", id="batch-1")
    tensor = req.inputs.add(name="IMAGE", datatype="BYTES", shape=[largest])
    tensor.contents.bytes_contents.extend(images[i % len(images)] for i in range(largest))
    req.outputs.add(name="DETECTIONS")
    req.parameters["score_threshold"].double_param = 0.4
    req.parameters["iou_threshold"].double_param = 0.5
    req.parameters["max_detections"].int64_param = 100
    req.parameters["class_filter"].string_param = "0,2,5"
    req.parameters["camera_id"].string_param = "dock-3"
    req.parameters["timeout"].int64_param = 200_000
    data = req.SerializeToString()
    assert parse_model_infer_request(data) == req


def test_a_group_does_not_turn_the_flood_check_off() -> None:
    """protobuf accepts an unknown group (here an empty one in field 15: two bytes, 0x7b 0x7c);
    the walk cannot read groups. When that handed the request to protobuf unchecked, 7 million
    class ids behind those two bytes were parsed with the GIL held. Refused now, in the time of
    the walk, with the frame's identity."""
    data = _flooded_options(7_000_000) + b"\x7b\x7c"
    assert len(pb.DetectRequest.FromString(data).options.class_filter) == 7_000_000  # what protobuf would do
    elapsed = float("inf")
    for _ in range(3):  # the least-disturbed of three, as above
        t0 = time.perf_counter()
        got = parse_detect_request(data)
        elapsed = min(elapsed, time.perf_counter() - t0)
    assert isinstance(got, Refused), type(got)
    assert "options are" in got.reason  # the first reason found: the options' size
    assert got.request.frame.camera_id == "front" and got.request.frame.sequence == 3
    assert elapsed < 0.005, f"{elapsed * 1e3:.1f} ms: the look must not scale with the entries"
    alone = request("front", 4, jpeg()).SerializeToString() + b"\x7b\x7c"  # a group and nothing else odd
    got = parse_detect_request(alone)
    assert isinstance(got, Refused) and "wire type 3 (a group)" in got.reason and got.request.frame.sequence == 4


def test_bytes_protobuf_refuses_after_the_walk_are_refused_with_the_identity() -> None:
    """A camera id that is not UTF-8 passes the walk, and protobuf's DecodeError used to escape
    the deserializer: gRPC ended the whole call INTERNAL."""
    bad_utf8 = request("ab", 5, jpeg()).SerializeToString().replace(b"\x0a\x02ab", b"\x0a\x02\xff\xfe", 1)
    field_zero = request("front", 6, jpeg()).SerializeToString() + b"\x00\x01"  # field number 0
    for data, seq in ((bad_utf8, 5), (field_zero, 6)):
        with pytest.raises(DecodeError):
            pb.DetectRequest.FromString(data)
        got = parse_detect_request(data)
        assert isinstance(got, Refused) and "not a valid DetectRequest" in got.reason, got
        assert got.request.frame.sequence == seq and got.ByteSize() == len(data)


def test_a_huge_camera_id_is_decoded_only_as_far_as_makes_it_too_long() -> None:
    """An 8 MiB camera id that is not UTF-8 took the walk 0.2-0.3 s to decode into the refusal's
    identity; the walk now decodes at most what makes an id too long, so it is still refused
    as one."""
    from perception.pipeline import MAX_CAMERA_ID_LEN

    huge = b"\xff" * (8 << 20)
    frame = b"\x0a" + bytes(_varint_bytes(len(huge))) + huge + pb.Frame(sequence=3, encoded=jpeg()).SerializeToString()
    data = b"\x0a" + bytes(_varint_bytes(len(frame))) + frame
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        got = parse_detect_request(data)
        best = min(best, time.perf_counter() - start)
    assert isinstance(got, Refused) and got.request.frame.sequence == 3
    assert MAX_CAMERA_ID_LEN < len(got.request.frame.camera_id) <= 4 * (MAX_CAMERA_ID_LEN + 1)
    assert best < 0.1, f"{best * 1e3:.0f} ms"


def _varint_bytes(n: int) -> bytearray:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return out


def test_the_options_cap_is_on_all_occurrences_together() -> None:
    """protobuf merges repeated occurrences of the options field: 62 of 16 KiB each parsed into
    a million class ids while each one passed the 16 KiB cap."""
    chunk = pb.DetectOptions(class_filter=[0] * 16_000).SerializeToString()
    assert len(chunk) < MAX_OPTIONS_BYTES
    field = bytes([2 << 3 | 2]) + _varint(len(chunk)) + chunk
    data = request("front", 8, jpeg()).SerializeToString() + field * 62
    assert len(pb.DetectRequest.FromString(data).options.class_filter) == 992_000  # protobuf merges them
    got = parse_detect_request(data)
    assert isinstance(got, Refused), type(got)
    assert "across 2 occurrences" in got.reason and str(MAX_OPTIONS_BYTES) in got.reason
    assert got.request.frame.sequence == 8
    two_small = request("front", 9, jpeg()).SerializeToString() + field + b"\x12\x02\x08\x07"  # + max_detections
    ok = parse_detect_request(two_small)
    assert not isinstance(ok, Refused) and _whole(ok) == pb.DetectRequest.FromString(two_small)


def test_a_stream_answers_unparseable_requests_invalid_in_order_and_goes_on(serve: Any) -> None:
    """One bad frame used to end the stream INTERNAL ("Exception deserializing request!") and
    lose every other answer in flight; now it is answered INVALID in its place."""
    run = serve(invalid_backoff_max_s=0)
    bad_utf8 = request("ab", 1, jpeg()).SerializeToString().replace(b"\x0a\x02ab", b"\x0a\x02\xff\xfe", 1)
    grouped = request("front", 2, jpeg()).SerializeToString() + b"\x7b\x7c"
    truncated = request("front", 3, jpeg()).SerializeToString() + b"\x12\x05\x08"  # options cut off
    reqs = [request("front", 0, jpeg()).SerializeToString(), bad_utf8, grouped, truncated,
            request("front", 4, jpeg()).SerializeToString()]
    stream = run.channel.stream_stream("/perception.v1.Detector/StreamDetect", request_serializer=None,
                                       response_deserializer=pb.DetectResponse.FromString)
    turn = threading.Semaphore(1)

    def lockstep() -> Any:  # one at a time: no frame of the camera is dropped stale for a newer one
        for r in reqs:
            turn.acquire()
            yield r

    out = []
    for answer in stream(lockstep(), timeout=30):
        out.append(answer)
        turn.release()
    assert [a.status for a in out] == [OK, INVALID, INVALID, INVALID, OK], [a.message for a in out]
    assert [a.sequence for a in out] == [0, 1, 2, 3, 4]
    assert "not a valid DetectRequest" in out[1].message and "a group" in out[2].message
    detect = run.channel.unary_unary("/perception.v1.Detector/Detect", request_serializer=None,
                                     response_deserializer=pb.DetectResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        detect(bad_utf8, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value


def test_a_stream_answers_a_flooded_request_invalid_and_goes_on(serve: Any) -> None:
    run = serve()
    flooded = pb.DetectRequest.FromString(_flooded_options(1_000_000))
    out = list(run.stub.StreamDetect(iter([request("front", 0, jpeg()), flooded, request("front", 2, jpeg())]),
                                     timeout=30))
    assert [a.status for a in out] == [OK, INVALID, OK]
    assert [a.sequence for a in out] == [0, 3, 2] and "options are" in out[1].message


def test_flooded_requests_no_longer_stall_the_other_cameras(serve: Any) -> None:
    """While one client sends 8 M-entry class filters back to back, another camera's round
    trips stay close to what they are alone: the server never parses those requests, which
    held the GIL 35-40 ms each."""
    run = serve()
    frame = jpeg()

    def round_trips(n: int) -> list[float]:
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            assert run.stub.Detect(request("honest", i, frame), timeout=10).status == OK
            out.append(time.perf_counter() - t0)
        return out

    round_trips(10)
    alone = statistics.median(round_trips(60))
    flooded = _flooded_options(8_000_000)  # sent as bytes: this process never (de)serializes it
    stream = run.channel.stream_stream("/perception.v1.Detector/StreamDetect", request_serializer=None,
                                       response_deserializer=pb.DetectResponse.FromString)
    stop = threading.Event()

    def flood() -> None:
        def reqs() -> Any:
            while not stop.is_set():
                yield flooded

        for answer in stream(reqs(), timeout=60):
            assert answer.status == INVALID

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    time.sleep(0.5)
    try:
        busy = statistics.median(round_trips(60))
    finally:
        stop.set()
        t.join(30)
    assert busy < 3 * alone + 0.005, (alone, busy)


# -- the KServe front door's ModelInfer ------------------------------------------------------------


def _infer_request(**contents: Any) -> Any:
    from perception.v1 import grpc_predict_v2_pb2 as kpb

    req = kpb.ModelInferRequest(model_name="tiny")
    tensor = req.inputs.add(name="IMAGE", datatype="UINT8", shape=[4, 4, 3])
    for name, values in contents.items():
        getattr(tensor.contents, name).extend(values)
    return req


def test_a_tritonclient_request_parses_as_protobuf_parses_it() -> None:
    from perception.v1 import grpc_predict_v2_pb2 as kpb
    from server.wire import parse_model_infer_request

    req = kpb.ModelInferRequest(model_name="tiny", id="7")
    req.inputs.add(name="IMAGE", datatype="BYTES", shape=[2])
    req.outputs.add(name="DETECTIONS")
    req.parameters["score_threshold"].double_param = 0.4
    req.raw_input_contents.append(b"\x03\x00\x00\x00abc" * 2)
    data = req.SerializeToString()
    assert parse_model_infer_request(data) == kpb.ModelInferRequest.FromString(data)
    small = _infer_request(uint_contents=[7] * 48)
    assert parse_model_infer_request(small.SerializeToString()) == small


def test_huge_typed_contents_and_floods_are_refused_before_parsing() -> None:
    from server.wire import MAX_TYPED_CONTENTS_BYTES, RefusedInfer, parse_model_infer_request

    data = _infer_request(uint_contents=[0] * 6_000_000).SerializeToString()  # a 1080p frame, typed
    t0 = time.perf_counter()
    got = parse_model_infer_request(data)
    assert time.perf_counter() - t0 < 0.005
    assert isinstance(got, RefusedInfer) and "uint_contents make 6000000 bytes" in got.reason
    assert str(MAX_TYPED_CONTENTS_BYTES) in got.reason and "raw_input_contents" in got.reason
    flood = _infer_request(bytes_contents=[b"x"] * MAX_INFER_REQUEST_FIELDS).SerializeToString()
    got = parse_model_infer_request(flood)
    assert isinstance(got, RefusedInfer) and "field budget" in got.reason, got
    assert "ran out in the request.inputs.contents" in got.reason


def test_the_kserve_front_door_answers_a_refused_request_invalid_argument(serve: Any) -> None:
    import grpc

    from perception.v1 import grpc_predict_v2_pb2 as kpb

    run = serve(kserve=True)
    infer = run.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
                                    response_deserializer=kpb.ModelInferResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        infer(_infer_request(uint_contents=[0] * 6_000_000).SerializeToString(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "uint_contents make 6000000 bytes" in (err.value.details() or "")


def test_a_group_does_not_turn_the_kserve_check_off() -> None:
    """The same two bytes made the KServe walk give up and protobuf parse 6 MB of typed
    contents."""
    from perception.v1 import grpc_predict_v2_pb2 as kpb
    from server.wire import RefusedInfer, parse_model_infer_request

    data = _infer_request(uint_contents=[0] * 6_000_000).SerializeToString() + b"\x7b\x7c"
    t0 = time.perf_counter()
    assert len(kpb.ModelInferRequest.FromString(data).inputs[0].contents.uint_contents) == 6_000_000
    parse_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = parse_model_infer_request(data)
    # Refused without the parse (a ratio, measured side by side: an absolute 5 ms failed on a
    # loaded CI machine at 6.5 ms, against tens of ms for the parse).
    assert time.perf_counter() - t0 < parse_s / 4, parse_s
    assert isinstance(got, RefusedInfer), got
    alone = _infer_request(uint_contents=[7] * 48).SerializeToString() + b"\x7b\x7c"
    got = parse_model_infer_request(alone)
    assert isinstance(got, RefusedInfer) and "a group" in got.reason, got


def test_typed_contents_split_into_chunks_count_as_one() -> None:
    """protobuf joins every occurrence of a packed field (and of the contents message): seven
    chunks of 200 KB parse as one 1.4 MB field. The cap is on their sum over the request, over
    every typed field together; a request just under it still parses."""
    from perception.v1 import grpc_predict_v2_pb2 as kpb
    from server.wire import MAX_TYPED_CONTENTS_BYTES, RefusedInfer, parse_model_infer_request

    def request_of(*contents: Any) -> bytes:
        tensor = kpb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="UINT8", shape=[4, 4, 3])
        tensor_bytes = tensor.SerializeToString() + b"".join(
            kpb.ModelInferRequest.InferInputTensor(contents=c).SerializeToString() for c in contents)
        field = bytes([5 << 3 | 2]) + _varint(len(tensor_bytes)) + tensor_bytes  # ModelInferRequest.inputs
        return kpb.ModelInferRequest(model_name="tiny").SerializeToString() + field

    chunk = kpb.InferTensorContents(uint_contents=[1] * 200_000)  # 200 KB of one-byte varints
    got = parse_model_infer_request(request_of(*[chunk] * 7))
    assert isinstance(got, RefusedInfer) and str(MAX_TYPED_CONTENTS_BYTES) in got.reason, got
    two_fields = [kpb.InferTensorContents(uint_contents=[1] * 600_000),
                  kpb.InferTensorContents(int_contents=[1] * 600_000)]
    assert isinstance(parse_model_infer_request(request_of(*two_fields)), RefusedInfer)
    ok = parse_model_infer_request(request_of(chunk, chunk))
    assert not isinstance(ok, RefusedInfer) and len(ok.inputs[0].contents.uint_contents) == 400_000


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)
