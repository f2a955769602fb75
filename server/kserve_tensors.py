"""The tensors of the KServe v2 front door (``server.kserve``): a ModelInfer request's
parameters, outputs and frames read and checked, and its answer written.

What a request may hold is described in ``server.kserve``'s docstring. Everything here is a
pure function of the request (no server state), and every failure is an ``InvalidInputError``
whose message quotes client strings cut to 64 characters (``shown``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from perception.decode import PixelFormat
from perception.errors import InvalidInputError
from perception.pipeline import MAX_CAMERA_ID_LEN, FrameInput, RawPixels, RequestOptions
from perception.types import Detections
from perception.v1 import grpc_predict_v2_pb2 as kpb
from server.served_model import ServedModel

INPUT = "IMAGE"
DETECTIONS = "DETECTIONS"
NUM_DETECTIONS = "NUM_DETECTIONS"
PARAMETERS = ("score_threshold", "iou_threshold", "max_detections", "class_filter", "class_agnostic_nms",
              "camera_id", "timeout")
# Triton reserves request parameters starting "triton_" and refuses those it does not know; stock
# clients send this one (perf_analyzer on every request, tritonclient's stream_infer when asked):
# answers on a stream then carry ``triton_final_response``.
EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"
TRITON_PARAMETERS = (EMPTY_FINAL_RESPONSE,)
# The one input parameter taken: the size of the input's raw contents, as the KServe SDK sends it.
BINARY_DATA_SIZE = "binary_data_size"


class Datatype(str, Enum):
    """The KServe tensor data types this model speaks."""

    BYTES = "BYTES"
    UINT8 = "UINT8"
    INT32 = "INT32"
    FP32 = "FP32"


OUTPUTS = {DETECTIONS: (Datatype.FP32, [-1, 6]), NUM_DETECTIONS: (Datatype.INT32, [-1])}


@dataclass(frozen=True)
class RequestFrames:
    """The frames of one ModelInfer request, not yet copied out of it."""

    encoded: Sequence[bytes | memoryview] = ()  # one encoded image per frame
    raw: memoryview | None = None  # B x H x W x 3 BGR bytes
    height: int = 0
    width: int = 0
    count: int = 0

    def frame(self, index: int, camera_id: str) -> FrameInput:
        if self.raw is None:
            return FrameInput(camera_id, 0, 0, encoded=bytes(self.encoded[index]))
        size = self.height * self.width * 3
        data = bytes(self.raw[index * size:(index + 1) * size])
        return FrameInput(camera_id, 0, 0, raw=RawPixels(self.width, self.height, 0, PixelFormat.BGR8, data))


def _ms(seconds: float | None) -> float:
    """Milliseconds, at least 1; 0 for none."""
    return max(1.0, seconds * 1000.0) if seconds else 0.0


def deadline_ms(timeout_ms: float, remaining_s: float | None) -> int:
    """A frame's deadline in ms from arrival (0 = none): the sooner of Triton's ``timeout``
    parameter and the call's gRPC deadline."""
    if remaining_s is not None and remaining_s <= 0:
        return 1  # the call is already past its deadline: its frames expire at once, not never
    limits = [x for x in (timeout_ms, _ms(remaining_s)) if x > 0]
    return math.ceil(min(limits)) if limits else 0


# -- request decoding ---------------------------------------------------------------------------


_NUMBER = ("double_param", "int64_param", "uint64_param")
_INTEGER = ("int64_param", "uint64_param")


class Parameters(NamedTuple):
    """A request's parameters, read."""

    options: RequestOptions
    camera_ids: str  # the camera_id parameter: one id, or one per frame comma-separated
    timeout_ms: float  # 0: none
    final_flag: bool  # triton_enable_empty_final_response: mark a stream's answers final


def parse_parameters(params: Mapping[str, kpb.InferParameter], max_class_filter: int) -> Parameters:
    reserved = sorted(p for p in params if p.startswith("triton_") and p not in TRITON_PARAMETERS)
    if reserved:  # as Triton answers them
        got = ", ".join(shown(r) for r in reserved[:8])
        raise InvalidInputError(f"parameters starting with 'triton_' are reserved; of those, only "
                                f"{list(TRITON_PARAMETERS)} are allowed, got [{got}]")
    unknown = sorted(set(params) - set(PARAMETERS) - set(TRITON_PARAMETERS))
    if unknown:
        got = ", ".join(shown(u) for u in unknown[:8])
        raise InvalidInputError(f"unknown parameters [{got}]; this model takes {list(PARAMETERS)}")
    thresholds = {n: float(_param(params, n, _NUMBER, "a number") or 0.0) for n in ("score_threshold", "iou_threshold")}
    for name, value in thresholds.items():
        if not math.isfinite(value):
            raise InvalidInputError(f"{name} must be a finite number, got {value}")
    opts = RequestOptions(
        score_threshold=thresholds["score_threshold"],
        iou_threshold=thresholds["iou_threshold"],
        max_detections=int(_param(params, "max_detections", _INTEGER, "an integer") or 0),
        class_filter=_class_ids(_param(params, "class_filter", ("string_param", *_INTEGER), 'ids like "0,2"'),
                                max_class_filter),
        class_agnostic=bool(_param(params, "class_agnostic_nms", ("bool_param",), "a bool")),
    )
    camera = str(_param(params, "camera_id", ("string_param",), "a string") or "")
    timeout_us = int(_param(params, "timeout", _INTEGER, "an integer (microseconds)") or 0)
    if timeout_us < 0:
        raise InvalidInputError(f"timeout must be >= 0 microseconds, got {timeout_us}")
    final_flag = bool(_param(params, EMPTY_FINAL_RESPONSE, ("bool_param",), "a bool"))
    return Parameters(opts, camera, _ms(timeout_us / 1e6), final_flag)


def _param(params: Mapping[str, kpb.InferParameter], name: str, kinds: tuple[str, ...], what: str) -> Any:
    """The value of parameter ``name`` (None if absent); InvalidInputError if not one of ``kinds``."""
    if name not in params:
        return None
    parameter = params[name]
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in kinds:
        raise InvalidInputError(f"parameter {name} must be {what}")
    return getattr(parameter, kind)


def _class_ids(value: str | int | None, max_class_filter: int) -> tuple[int, ...]:
    if value is None or isinstance(value, int):
        return () if value is None else (value,)
    if len(value) > max_class_filter * 12:  # measured before anything is split: 10 digits, a comma, a space
        raise InvalidInputError(f"class_filter is {len(value)} characters long; the ids of this model's "
                                f"{max_class_filter} classes take at most {max_class_filter * 12}")
    tokens = [t.strip() for t in value.split(",") if t.strip()]
    if len(tokens) > max_class_filter:
        raise InvalidInputError(f"class_filter has more than {max_class_filter} entries (one per class)")
    # ASCII digits only: int() also read "1_0" as 10, "+1" and other scripts' digits.
    if not all(t.isascii() and t.isdigit() and len(t) <= 10 for t in tokens):
        raise InvalidInputError(f'class_filter must be class ids like "0,2", got {shown(value)}')
    return tuple(int(t) for t in tokens)


def frame_cameras(camera_ids: str, count: int) -> list[str]:
    """One camera id per frame: one id for all of them, or one each (comma-separated)."""
    if camera_ids.count(",") + 1 not in (1, count):  # counted before anything is split
        raise InvalidInputError(f"camera_id must name one camera, or {count} comma-separated (one per frame)")
    ids = camera_ids.split(",")
    if any(len(c) > MAX_CAMERA_ID_LEN for c in ids):  # before an id is counted (a metric label)
        raise InvalidInputError(f"camera_id is longer than {MAX_CAMERA_ID_LEN} characters")
    return ids * count if len(ids) == 1 else ids


def requested_outputs(request: kpb.ModelInferRequest) -> list[str]:
    names = [o.name for o in request.outputs]
    for o in request.outputs:
        if o.name not in OUTPUTS:
            raise InvalidInputError(f"unknown output {shown(o.name)}; this model has {list(OUTPUTS)}")
        # binary_data: the KServe SDK's RequestedOutput sends it; gRPC answers are binary anyway.
        other = [p for p in o.parameters if not (p == "binary_data" and
                                                 o.parameters[p].WhichOneof("parameter_choice") == "bool_param")]
        if other:
            got = ", ".join(shown(p) for p in other[:8])
            raise InvalidInputError(f"output parameters are not supported (got [{got}] for {shown(o.name)}; "
                                    "shared memory and classification are not served)")
    if len(set(names)) != len(names):
        raise InvalidInputError(f"outputs requested more than once: [{', '.join(shown(n) for n in names[:8])}]")
    return names or list(OUTPUTS)


def request_frames(request: kpb.ModelInferRequest, max_frames: int) -> RequestFrames:
    """The frames of the request's one input, checked against its datatype and shape."""
    if [t.name for t in request.inputs] != [INPUT]:
        raise InvalidInputError(f"this model takes exactly one input {INPUT!r}, got "
                                f"[{', '.join(shown(t.name) for t in request.inputs[:8])}]")
    tensor = request.inputs[0]
    # binary_data_size: the KServe SDK's InferInput sends it with every numpy input (its
    # binary_data default), and its gRPC client passes input parameters on: refused, every
    # request of that client was.
    other = [p for p in tensor.parameters if p != BINARY_DATA_SIZE]
    if other:
        got = ", ".join(shown(p) for p in other[:8])
        raise InvalidInputError(f"input parameters are not supported (got [{got}]; shared memory is not served)")
    raw: bytes | None = None
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1 or tensor.HasField("contents"):
            raise InvalidInputError("raw_input_contents must hold one entry per input, and no input may also "
                                    "carry typed contents")
        raw = request.raw_input_contents[0]
    if BINARY_DATA_SIZE in tensor.parameters:
        size = tensor.parameters[BINARY_DATA_SIZE]
        kind = size.WhichOneof("parameter_choice")
        if kind not in _INTEGER:
            raise InvalidInputError(f"parameter {BINARY_DATA_SIZE} must be an integer")
        if raw is not None and getattr(size, kind) != len(raw):
            raise InvalidInputError(f"{BINARY_DATA_SIZE} is {getattr(size, kind)} but raw_input_contents holds "
                                    f"{len(raw)} bytes")
    shape = _Shape(tensor.shape)
    if any(d < 1 for d in shape):
        raise InvalidInputError(f"{INPUT} shape {shape} has a dimension < 1")
    if tensor.datatype == Datatype.BYTES.value:
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise InvalidInputError(f"{INPUT} as BYTES must have shape [B] (one encoded image each), got {shape}")
        count = _check_count(shape[0], max_frames)
        if raw is not None:
            return RequestFrames(encoded=_split_bytes(memoryview(raw), count), count=count)
        if len(tensor.contents.bytes_contents) != count:
            raise InvalidInputError(f"{INPUT} shape {shape} needs {count} bytes_contents elements, "
                                    f"got {len(tensor.contents.bytes_contents)}")
        return RequestFrames(encoded=list(tensor.contents.bytes_contents), count=count)
    if tensor.datatype == Datatype.UINT8.value:
        if len(shape) not in (3, 4) or shape[-1] != 3:
            raise InvalidInputError(f"{INPUT} as UINT8 must be raw BGR pixels of shape [H, W, 3] or "
                                    f"[B, H, W, 3], got {shape}")
        count = _check_count(shape[0] if len(shape) == 4 else 1, max_frames)
        height, width = shape[-3], shape[-2]
        need = count * height * width * 3
        if raw is None:
            values = tensor.contents.uint_contents
            if len(values) != need:
                raise InvalidInputError(f"{INPUT} shape {shape} needs {need} uint_contents elements, got {len(values)}")
            array = np.asarray(values, np.uint32)
            if len(array) and int(array.max()) > 255:
                raise InvalidInputError(f"{INPUT} UINT8 contents hold values above 255")
            raw = array.astype(np.uint8).tobytes()
        if len(raw) != need:
            raise InvalidInputError(f"{INPUT} shape {shape} needs {need} bytes of UINT8 pixels, got {len(raw)}")
        return RequestFrames(raw=memoryview(raw), height=height, width=width, count=count)
    raise InvalidInputError(f"{INPUT} must be BYTES (encoded JPEG/PNG) or UINT8 (raw BGR, HWC), "
                            f"got {shown(tensor.datatype)}")


class _Shape(list[int]):
    """A request's shape, quoted in errors by its first dims only: sent unpacked, 1,900 dims of
    2**63 - 1 fit in 19 KB, and quoted whole they made the status too large for gRPC's metadata
    (the client got RESOURCE_EXHAUSTED instead of the error, as ``shown`` says)."""

    def __str__(self) -> str:
        more = f", ... ({len(self)} dims)" if len(self) > 6 else ""
        return "[" + ", ".join(str(d) for d in self[:6]) + more + "]"

    __repr__ = __str__


def shown(text: str, limit: int = 64) -> str:
    """A client's string as an error message quotes it: at most ``limit`` characters. Quoted
    whole, a 20 KB model name made the answer's status too large for gRPC's metadata, and the
    client got RESOURCE_EXHAUSTED instead of the error."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _check_count(count: int, max_frames: int) -> int:
    if count > max_frames:
        raise InvalidInputError(f"{count} frames in one request; at most {max_frames} (the model's batch)")
    return count


def _split_bytes(raw: memoryview, count: int) -> list[memoryview]:
    """The elements of a raw BYTES tensor: each a 4-byte little-endian length, then its bytes."""
    out: list[memoryview] = []
    pos, end = 0, len(raw)
    for i in range(count):
        if pos + 4 > end:
            raise InvalidInputError(f"{INPUT} raw contents end before element {i} of {count}")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if size > end - pos:
            raise InvalidInputError(f"{INPUT} element {i} says {size} bytes but {end - pos} remain")
        out.append(raw[pos:pos + size])
        pos += size
    if pos != end:
        raise InvalidInputError(f"{INPUT} raw contents hold {end - pos} bytes past its {count} elements")
    return out


# -- response encoding --------------------------------------------------------------------------


def detection_rows(det: Detections) -> NDArray[np.float32]:
    """(N, 6) float32: x1, y1, x2, y2, score, class_id; (0, 6) for no detections."""
    return np.column_stack([det.boxes, det.scores, det.class_ids.astype(np.float32)]).astype(np.float32)


def infer_response(request_id: str, model: ServedModel, detections: list[Detections],
                   wanted: list[str]) -> kpb.ModelInferResponse:
    arrays: dict[str, NDArray[Any]] = {
        DETECTIONS: np.concatenate([detection_rows(d) for d in detections]).astype("<f4"),
        NUM_DETECTIONS: np.array([len(d) for d in detections], "<i4"),
    }
    response = kpb.ModelInferResponse(model_name=model.manifest.name, model_version=model.version, id=request_id)
    for out in wanted:
        array = arrays[out]
        response.outputs.add(name=out, datatype=OUTPUTS[out][0].value, shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
    return response


__all__ = ["DETECTIONS", "EMPTY_FINAL_RESPONSE", "FINAL_RESPONSE", "INPUT", "NUM_DETECTIONS", "OUTPUTS",
           "PARAMETERS", "Datatype", "Parameters", "RequestFrames", "deadline_ms", "detection_rows", "frame_cameras",
           "infer_response", "parse_parameters", "request_frames", "requested_outputs", "shown"]
