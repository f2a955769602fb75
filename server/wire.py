"""A cheap look at a ``DetectRequest``'s wire bytes before protobuf parses it whole.

protobuf parses a message while holding the GIL, and its time grows with the number of
fields, not bytes. A 16 MiB frame parses in under a millisecond. An 8 MB request holding 8
million class-filter entries takes 35-40 ms, and every other thread of the server stops
meanwhile: a few such requests a second, from one client, multiplied the honest cameras' p99.

``parse_detect_request`` is the request deserializer of ``Detect`` and ``StreamDetect``. It
first walks the fields of the messages a frame is made of: the request, its frame, the frame's
raw image or shared-memory reference, and the options. Payloads (the image bytes) are skipped
by their length. The walk gives up past ``MAX_FIELDS`` fields in one message, and past
``MAX_REQUEST_FIELDS`` in the whole request, all its messages together: with the cap per message
alone, 64 frames of 62 raw images of 64 fields (774 KB) made a walk of 258,000 fields, 0.2 s of
pure Python. So the walk costs at most about a millisecond (0.7-0.9 ms measured on a 2-core
machine, for 256 fields of 15 bytes, the costliest to read); of a camera id it decodes only as
many bytes as make an id too long. Then it either parses the request, or refuses it:

- a message with more than ``MAX_FIELDS`` fields (a camera frame has about ten), or a request
  with more than ``MAX_REQUEST_FIELDS`` in all;
- options longer than ``MAX_OPTIONS_BYTES`` in all: protobuf merges every occurrence of the
  options field into one message, so the cap is on their sum, not on each (62 occurrences of
  16 KiB parsed into a million class ids);
- bytes the walk cannot read: a truncated varint, a length past the end, a group or a reserved
  wire type. They are refused, not handed to protobuf, which accepts an unknown group: two
  bytes (an empty group in an unknown field) appended to a request with 7 million class ids
  made the walk give up, and protobuf then built all 7 million with the GIL held;
- bytes protobuf refuses after the walk passed them (a camera id that is not UTF-8, field
  number 0). Raised from the deserializer, its error would end the call INTERNAL ("Exception
  deserializing request!") and a stream's every camera would lose its answers in flight.

A refused request comes back as ``Refused``: the frame's identity (camera, sequence, capture
time, deadline, read during the walk, as far as it got) and the reason. The service answers it
INVALID in order, and a stream goes on.

An accepted frame comes back as ``Received``: its image bytes a view of the received bytes,
the rest parsed by protobuf, so the image is held once, not three times (see ``Received``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from perception.errors import InvalidInputError
from perception.pipeline import MAX_CAMERA_ID_LEN
from perception.v1 import detector_pb2 as pb

MAX_FIELDS = 64  # in one message of a DetectRequest (a camera frame has about ten)
# Fields in all the messages of one request together. A camera frame has 10-20 (its options
# included); a KServe batch of BYTES frames has one per frame (at most 1024, ServerConfig's
# largest max_batch) and a few dozen more.
MAX_REQUEST_FIELDS = 256
MAX_INFER_REQUEST_FIELDS = 2048
MAX_OPTIONS_BYTES = 16 * 1024
# The bytes of a camera id the walk decodes: enough for MAX_CAMERA_ID_LEN + 1 characters of up
# to 4 bytes each, so an id cut there is still refused as too long.
_CAMERA_ID_BYTES = 4 * (MAX_CAMERA_ID_LEN + 1)

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# DetectRequest: frame = 1, options = 2. Frame: camera_id = 1, sequence = 2,
# capture_timestamp_ns = 3, encoded = 4, raw = 5, deadline_ms = 6, shm = 7 (and resent = 8, which
# protobuf parses with the rest). RawImage: data = 5.
_FRAME, _OPTIONS = 1, 2
_CAMERA, _SEQUENCE, _CAPTURE, _ENCODED, _RAW, _DEADLINE, _SHM = 1, 2, 3, 4, 5, 6, 7
_DATA = 5


@dataclass(frozen=True)
class Refused:
    """A request refused before it was parsed: what identifies its frame, and why.

    request: a DetectRequest holding only the frame's identity fields.
    size: the request's length on the wire (it counts against the undecoded-bytes budgets).
    """

    request: pb.DetectRequest
    reason: str
    size: int

    def ByteSize(self) -> int:  # noqa: N802  # the protobuf name, as callers ask requests
        return self.size


class _Malformed(Exception):
    """The walk could not read the bytes (the message says where): the request is refused."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("a varint is truncated or longer than 10 bytes")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


class _Budget:
    """The fields one request's walk may still visit, over all its messages together."""

    def __init__(self, limit: int) -> None:
        self.limit = self.left = limit


def _fields(buf: memoryview, start: int, end: int, what: str, budget: _Budget,
            cap: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in buf[start:end], in
    order; for a varint the value is in the third slot. Every field yielded is taken from
    ``budget``. Raises ValueError at field ``cap`` + 1 of this message (None: no cap) or at the
    field past the budget, _Malformed for bytes it cannot read."""
    count = 0
    pos = start
    while pos < end:
        if count == cap:
            raise ValueError(f"the request's {what} has more than {cap} fields: not a camera frame")
        if not budget.left:
            raise ValueError(f"the request has more than {budget.limit} fields in all its messages, the "
                             f"field budget of the look before parsing (it ran out in the {what})")
        count += 1
        budget.left -= 1
        key, pos = _varint(buf, pos, end)
        number, kind = key >> 3, key & 7
        if kind == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, kind, value, pos
        elif kind == _LEN:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed(f"field {number} (in the {what}) is {length} bytes long, past its end")
            yield number, kind, pos, pos + length
            pos += length
        elif kind in (_I64, _I32):
            size = 8 if kind == _I64 else 4
            if pos + size > end:
                raise _Malformed(f"field {number} (in the {what}) is cut off")
            yield number, kind, pos, pos + size
            pos += size
        else:  # groups (3, 4) and the unused wire types 6, 7: nothing a camera sends
            what_kind = "a group" if kind in (3, 4) else "a reserved wire type"
            raise _Malformed(f"field {number} (in the {what}) has wire type {kind} ({what_kind}), which no "
                             "proto3 message has")


def _walk(fields: Iterator[tuple[int, int, int, int]]) -> None:
    for _ in fields:
        pass


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True)
class Received:
    """An accepted camera frame whose image bytes were kept out of protobuf.

    protobuf copies a bytes field when it parses the message and again at every read of it, so
    a 16 MiB frame would be held three times over (gRPC's bytes, the parsed message, the field's
    copy). Here the image is ``payload``, a view of the received bytes, and ``request`` is the
    rest of the message, parsed from a copy that leaves the image out.

    kind: ``"encoded"`` (the frame's JPEG/PNG bytes) or ``"raw"`` (``request.frame.raw`` holds
    the raw image's size and format, its ``data`` is the payload).
    size: the request's length on the wire.
    """

    request: pb.DetectRequest
    kind: str
    payload: memoryview
    size: int

    def ByteSize(self) -> int:  # noqa: N802  # the protobuf name, as callers ask requests
        return self.size

    def release(self) -> None:
        """Let the image bytes go once the frame is prepared (decoded and letterboxed). A unary
        call's request is held by gRPC until the call returns, so without this a frame waiting
        for the engine kept its encoded bytes (up to the message limit) beside its tensor.
        ``size`` stays what was received."""
        object.__setattr__(self, "payload", memoryview(b""))


# (tag start, value start, value end, field number) of a length-delimited field.
_Span = tuple[int, int, int, int]


def check(data: bytes) -> tuple[str, pb.Frame, list[_Span] | None]:
    """The reason to refuse ``data`` ("" to parse it), the frame identity read on the way, and
    the path to the frame's image bytes (the frame field, then the encoded field, or the raw
    field and its data field) when that image can be cut out of the message without changing
    what protobuf would parse (one frame field, one image field, one data field); else None.
    Bytes the walk cannot read are a reason to refuse too (module docstring)."""
    buf = memoryview(data)
    budget = _Budget(MAX_REQUEST_FIELDS)
    identity = pb.Frame()
    reason = ""
    frames: list[_Span] = []
    images: list[_Span] = []
    datas: list[_Span] = []
    options_bytes = options_seen = 0
    try:
        start = 0
        for number, kind, a, b in _fields(buf, 0, len(buf), "top level", budget, MAX_FIELDS):
            if number == _OPTIONS and kind == _LEN:
                # protobuf merges every occurrence into one message: the cap is on their sum.
                options_bytes += b - a
                options_seen += 1
                if options_bytes > MAX_OPTIONS_BYTES:
                    across = f" across {options_seen} occurrences of the field" if options_seen > 1 else ""
                    reason = reason or (f"the request's options are {options_bytes} bytes{across}; at most "
                                        f"{MAX_OPTIONS_BYTES} (a class filter holds at most one entry per class)")
                else:
                    _walk(_fields(buf, a, b, "options", budget, MAX_FIELDS))
            elif number == _FRAME and kind != _LEN:
                frames.append((start, a, b, -1))  # not a message (protobuf will say so): no cut
            elif number == _FRAME:
                frames.append((start, a, b, number))
                f_start = a
                for f_number, f_kind, fa, fb in _fields(buf, a, b, "frame", budget, MAX_FIELDS):
                    if f_kind == _VARINT and f_number == _SEQUENCE:
                        identity.sequence = fa
                    elif f_kind == _VARINT and f_number == _CAPTURE:
                        identity.capture_timestamp_ns = _signed(fa)
                    elif f_kind == _VARINT and f_number == _DEADLINE:
                        identity.deadline_ms = fa & 0xFFFFFFFF
                    elif f_kind == _LEN and f_number == _CAMERA:
                        # At most what makes an id too long (4 bytes a character), however
                        # long the field: an 8 MiB id that is not UTF-8 took 0.2-0.3 s to decode.
                        cut = min(fb, fa + _CAMERA_ID_BYTES)
                        identity.camera_id = bytes(buf[fa:cut]).decode("utf-8", "replace")
                    elif f_number in (_ENCODED, _RAW, _SHM):
                        images.append((f_start, fa, fb, f_number if f_kind == _LEN else -1))
                        if f_kind == _LEN and f_number in (_RAW, _SHM):
                            r_start = fa
                            for r_number, r_kind, ra, rb in _fields(
                                    buf, fa, fb, "raw image" if f_number == _RAW else "shared-memory reference",
                                    budget, MAX_FIELDS):
                                if f_number == _RAW and r_number == _DATA:
                                    datas.append((r_start, ra, rb, r_number if r_kind == _LEN else -1))
                                r_start = rb
                    f_start = fb
            start = b
    except ValueError as exc:
        reason = reason or str(exc)
    except _Malformed as exc:
        reason = reason or f"the request is not a DetectRequest: its bytes cannot be read ({exc})"
    path: list[_Span] | None = None
    if not reason and len(frames) == 1 and frames[0][3] == _FRAME and len(images) == 1:
        if images[0][3] == _ENCODED:
            path = [frames[0], images[0]]
        elif images[0][3] == _RAW and len(datas) == 1 and datas[0][3] == _DATA:
            path = [frames[0], images[0], datas[0]]
    return reason, identity, path


def _key_and_length(number: int, length: int) -> bytes:
    out = bytearray()
    for value in ((number << 3) | _LEN, length):
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def _cut(buf: memoryview, path: list[_Span], start: int, end: int) -> bytes:
    """buf[start:end] without the innermost field of ``path``; each enclosing field's length
    prefix is rewritten for what is left of it."""
    tag, a, b, number = path[0]
    if len(path) == 1:
        return bytes(buf[start:tag]) + bytes(buf[b:end])
    inner = _cut(buf, path[1:], a, b)
    return bytes(buf[start:tag]) + _key_and_length(number, len(inner)) + inner + bytes(buf[b:end])


def parse_detect_request(data: bytes) -> pb.DetectRequest | Refused | Received:
    """The request deserializer of Detect and StreamDetect (module docstring). Never raises for
    what a client sent: whatever cannot be parsed comes back ``Refused``."""
    reason, identity, path = check(data)
    if reason:
        return Refused(pb.DetectRequest(frame=identity), reason, len(data))
    buf = memoryview(data)
    try:
        if path is None:
            return pb.DetectRequest.FromString(data)
        rest = pb.DetectRequest.FromString(_cut(buf, path, 0, len(buf)))
    except DecodeError as exc:
        return Refused(pb.DetectRequest(frame=identity), f"the request is not a valid DetectRequest: {exc}",
                       len(data))
    _, a, b, _ = path[-1]
    return Received(rest, "encoded" if len(path) == 2 else "raw", buf[a:b], len(data))


# -- KServe v2 ModelInferRequest ------------------------------------------------------------------
#
# The same look, for the KServe front door. A schema names the fields to descend into (number ->
# (name, sub-schema)) and caps packed repeated fields in bytes (number -> (name, cap)). The
# request's messages share a budget of MAX_INFER_REQUEST_FIELDS fields, and none has a cap of
# its own: a batch's bytes_contents are one field per frame. With a cap of 64 per message
# instead, 14 inputs of 63 parameters of 63 values of 64 fields (6.95 MiB) made a walk of 3.5
# million fields, 3.1-5.6 s; the budget bounds the walk at 6-10 ms (measured on a 2-core machine,
# for 2048 fields of 15 bytes, the costliest to read).

Schema = dict[int, tuple[str, "Schema | int"]]
MAX_TYPED_CONTENTS_BYTES = 1 << 20
_MAP_ENTRY: Schema = {2: ("value", {})}
_CONTENTS: Schema = {n: (name, MAX_TYPED_CONTENTS_BYTES) for n, name in enumerate(
    ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents", "fp32_contents",
     "fp64_contents"), start=1)}
_INPUT: Schema = {3: ("shape", 256), 4: ("parameters", _MAP_ENTRY), 5: ("contents", _CONTENTS)}
MODEL_INFER_REQUEST: Schema = {4: ("parameters", _MAP_ENTRY), 5: ("inputs", _INPUT),
                               6: ("outputs", {2: ("parameters", _MAP_ENTRY)})}


def check_schema(data: bytes, schema: Schema, what: str = "request") -> str:
    """The reason to refuse ``data`` by ``schema`` ("" to parse it); raises _Malformed.

    The packed fields of one message kind share their cap, summed over the whole request (all
    typed contents together): protobuf joins every occurrence of a repeated field (and of a
    message field) into one, so seven 1 MiB chunks of one field parse as a 7 MiB field, tens of
    milliseconds with the GIL held, and seven fields of 1 MiB cost the same."""
    buf = memoryview(data)
    budget = _Budget(MAX_INFER_REQUEST_FIELDS)
    totals: dict[str, int] = {}

    def walk(start: int, end: int, schema: Schema, what: str) -> None:
        for number, kind, a, b in _fields(buf, start, end, what, budget):
            entry = schema.get(number)
            if kind != _LEN or entry is None:
                continue
            name, sub = entry
            if isinstance(sub, int):
                total = totals[what] = totals.get(what, 0) + b - a
                if total > sub:
                    raise ValueError(f"the {what}'s {name} make {total} bytes; at most {sub} in a request (send "
                                     "large tensors in raw_input_contents)")
            else:
                walk(a, b, sub, f"{what}.{name}")

    try:
        walk(0, len(buf), schema, what)
    except ValueError as exc:
        return str(exc)
    return ""


@dataclass(frozen=True)
class RefusedInfer:
    """A request refused before it was parsed (a KServe ModelInfer, or a small request of
    either service), and why."""

    reason: str


# The largest request of a method that carries no frame (readiness, metadata, model info):
# names and a version, a few hundred bytes. Parsed unchecked, 8 MiB of one repeated field held
# the GIL for 38-62 ms a request, stalling every thread of the server (a review's measurement).
MAX_SMALL_REQUEST_BYTES = 64 * 1024


def small_request_parser(message: Any) -> Callable[[bytes], Any]:
    """A request deserializer for a method that carries no frame: ``RefusedInfer`` for a
    request over ``MAX_SMALL_REQUEST_BYTES`` or bytes that are no ``message`` (which gRPC would
    answer INTERNAL, "Exception deserializing request!", counted nowhere), else the parsed
    request. The handler raises InvalidInputError with the reason (``refuse_or``)."""

    def parse(data: bytes) -> Any:
        if len(data) > MAX_SMALL_REQUEST_BYTES:
            return RefusedInfer(f"a {message.DESCRIPTOR.name} of {len(data)} bytes; it takes a few hundred "
                                f"(at most {MAX_SMALL_REQUEST_BYTES})")
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return RefusedInfer(f"the request is not a {message.DESCRIPTOR.name}: {exc}")

    return parse


def refuse_or(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``behavior(request, context)`` for a request ``small_request_parser`` parsed; raises
    InvalidInputError (INVALID_ARGUMENT, through the error interceptor) for one it refused."""

    def serve(parsed: Any, context: Any) -> Any:
        if isinstance(parsed, RefusedInfer):
            raise InvalidInputError(parsed.reason)
        return behavior(parsed, context)

    return serve


def parse_model_infer_request(data: bytes) -> Any:
    """The request deserializer of the KServe front door's ModelInfer: ``RefusedInfer`` for a
    field flood, oversized typed contents, bytes the walk cannot read (a group would make it
    give up while protobuf parses the rest, typed contents and all: refused, as for
    DetectRequest) or bytes that are no ModelInferRequest (which gRPC would answer INTERNAL,
    "Exception deserializing request!"), else the parsed request."""
    from perception.v1 import grpc_predict_v2_pb2 as kpb

    try:
        reason = check_schema(data, MODEL_INFER_REQUEST)
    except _Malformed as exc:
        reason = f"the request is not a ModelInferRequest: its bytes cannot be read ({exc})"
    if reason:
        return RefusedInfer(reason)
    try:
        return kpb.ModelInferRequest.FromString(data)
    except DecodeError as exc:
        return RefusedInfer(f"the request is not a ModelInferRequest: {exc}")
