"""What ``perception import`` learns of an ONNX file before it writes anything: the image
input it declares (``read_onnx``), and what one pad-coloured frame through it and its layout's
decoder gives (``probe_model``). Each model a server could load and then not serve is refused
here in one line (ModelError / ConfigError) naming the user's file, never the staging copy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from perception.errors import ConfigError, ModelError
from perception.layouts.base import static_dim
from perception.manifest import PostprocessSpec, PreprocessSpec

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from perception.layouts import LayoutDecoder
    from perception.pipeline import FramePipeline, Prepared
    from server.runtime.base import Backend

log = logging.getLogger(__name__)


def read_onnx(path: Path) -> tuple[Any, tuple[int, int] | None, int | None]:
    """(model proto, (width, height) of its image input if fixed, its fixed batch if any: 1).
    ModelError in one line if the file is not a usable ONNX model. A dimension written as a
    value <= 0 (-1: Paddle2ONNX, tf2onnx) is dynamic, and is made a named one in the proto
    returned (the copy the artifact ships), as onnxruntime runs a 0 as a literal 0."""
    import onnx

    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends, untyped
        raise ModelError(f"{path}: not an ONNX model ({type(exc).__name__})") from exc
    if not proto.HasField("graph"):
        # protobuf reads an empty file as an empty model, which then "had no image input".
        why = "the file is empty" if path.stat().st_size == 0 else "it holds no graph"
        raise ModelError(f"{path}: not an ONNX model ({why})")
    plugins = tensorrt_only_ops(proto)
    if plugins:
        # onnxruntime (which checks, scores and serves imports) has no kernel for these: its own
        # error ("Could not find an implementation for EfficientNMS_TRT") does not say what to do.
        raise ModelError(f"{path}: the graph uses TensorRT plugin op(s) {plugins}, which only TensorRT can run (a "
                         "TensorRT end-to-end export); re-export it with NMS built from standard ONNX ops "
                         "(NonMaxSuppression; import as nms_detections) or without NMS (e.g. --layout yolov8)")
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1:
        raise ModelError(f"{path}: expected one image input, the model has {[i.name for i in inputs]}")
    elem = inputs[0].type.tensor_type.elem_type
    if elem not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.FLOAT):
        # Every runtime here feeds float32: a half-precision input fails on the first frame.
        raise ModelError(f"{path}: input {inputs[0].name!r} is {onnx.TensorProto.DataType.Name(elem).lower()}; the "
                         "server feeds float32: re-export with a float32 input (e.g. Ultralytics without half=True); "
                         "`perception import --data` builds and gates an FP16 variant itself")
    for value in (*inputs, *proto.graph.output):
        for axis, d in enumerate(value.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.dim_param = f"{value.name}_{axis}"  # (clears dim_value: they are one protobuf oneof)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) not in (3, 4) or (dims[-3] not in (3, None)):
        raise ModelError(f"{path}: input {inputs[0].name!r} has shape {dims}; expected (B, 3, H, W) or (3, H, W)")
    if dims[-3] is None and dims[-1] == 3:
        # (1, H?, W?, 3): channel-last with a dynamic size, which the check above lets through.
        raise ModelError(f"{path}: input {inputs[0].name!r} has shape {dims}, channel-last (NHWC); the server "
                         "feeds (B, 3, H, W): re-export it channel-first")
    h, w = dims[-2], dims[-1]
    batch = dims[0] if len(dims) == 4 else None
    if batch is not None and batch > 1:
        # onnxruntime would serve it by padding every batch to this size: one camera's frame
        # cost the work of `batch` (34x on a tiny model), while the manifest said max batch 8;
        # and a TensorRT engine, built for batches 1..max batch, cannot be made of it at all.
        raise ModelError(f"{path}: input {inputs[0].name!r} has a fixed batch of {batch} ({dims}): every run would "
                         f"compute {batch} frames however few are sent, and no TensorRT engine can be built of it; "
                         "re-export it with a dynamic batch axis (Ultralytics dynamic=True; torch.onnx.export "
                         "dynamic_axes) or a batch of 1")
    return proto, ((int(w), int(h)) if h and w else None), batch


def tensorrt_only_ops(proto: Any) -> list[str]:
    """The distinct TensorRT plugin ops of the graph (``EfficientNMS_TRT``, ``BatchedNMS_TRT``,
    ... or anything in a ``trt`` domain), which only TensorRT has kernels for."""
    ops = {n.op_type for n in proto.graph.node
           if n.op_type.endswith("_TRT") or n.domain.lower().startswith("trt")}
    return sorted(ops)


def input_rank(proto: Any) -> int:
    """The rank of the model's one image input: 3 for a single-image export."""
    inits = {i.name for i in proto.graph.initializer}
    first = next(i for i in proto.graph.input if i.name not in inits)
    return len(first.type.tensor_type.shape.dim)


def input_name(proto: Any) -> str:
    """The name of the model's one image input (``read_onnx`` checked there is one)."""
    inits = {i.name for i in proto.graph.initializer}
    return next(i.name for i in proto.graph.input if i.name not in inits)


def probe_model(
    path: Path, source: Path, pre: PreprocessSpec, post: PostprocessSpec, classes: Sequence[str], root: Path,
    dynamic_size: bool, max_batch: int,
) -> tuple[dict[str, str], int]:
    """Bind the model's outputs to its layout's roles (as the server's runtime reports them),
    then run one pad-coloured frame of the chosen input size through the model and the
    layout's decoder as the server would, then a batch of up to ``max_batch`` such frames;
    return ({role: output name}, the max batch to record).

    Without --data nothing else runs the model before a server does, and a server that loads
    it starts healthy and then fails every frame: a half-precision or channel-last input, an
    input size the network cannot take, prior boxes of another count than its boxes, outputs
    the layout cannot decode, boxes or scores that are all NaN / Inf. Each is refused here in
    one line (ModelError / ConfigError). ``path``: the staging copy that runs; ``source``: the
    user's file, which errors name (the copy is deleted when the import fails); ``root``: the
    staging directory the priors file is in."""
    from perception.layouts.ssd import implausible_outputs
    from perception.pipeline import EVAL_REQUEST, FrameInput, FramePipeline, frame_outputs, load_priors
    from server.runtime.factory import RuntimeSettings, open_backend

    priors = load_priors(root / post.priors.file) if post.priors is not None else None
    pipeline = FramePipeline(pre, post, classes, priors=priors)
    try:
        backend = open_backend(path, RuntimeSettings(threads=1, max_batch=max_batch))
    except ModelError as exc:
        raise ModelError(f"{source}: onnxruntime cannot load it: {_ort_reason(exc.__cause__ or exc)}") from exc
    try:
        roles = pipeline.bind_outputs(backend.outputs)
        if priors is not None:
            info = next(o for o in backend.outputs if o.name == roles["boxes"])
            n = static_dim(info, -2)
            if n is not None and n != len(priors):
                raise ConfigError(f"--priors has {len(priors)} prior boxes, but the model's boxes output {info.name!r} "
                                  f"{list(info.shape)} has {n}: pass the priors this model was trained with")
        ok, png = cv2.imencode(".png", np.full((pre.input_height, pre.input_width, 3), pre.pad_value, np.uint8))
        assert ok  # a small uint8 image always encodes
        prepared = pipeline.prepare(FrameInput("import-probe", 0, 0, encoded=png.tobytes()), EVAL_REQUEST)
        frame = f"one {pre.input_width}x{pre.input_height} frame"
        try:
            out = frame_outputs(backend.infer(pipeline.to_batch([prepared.tensor])), 0)
            pipeline.finish(out, prepared)
        except (ModelError, ValueError, IndexError) as exc:
            hint = (f" (is {pre.input_width}x{pre.input_height} a size it takes, e.g. a multiple of its stride?)"
                    if dynamic_size else "")
            raise ModelError(f"{source}: {frame} does not go through the model and the {post.output_layout} "
                             f"decoder{hint}: {exc}") from exc
        by_role = {role: out[name] for role, name in roles.items()}
        _check_finite(source, frame, pipeline.decoder, by_role, roles)
        if post.output_layout == "ssd":
            why = implausible_outputs(by_role, pipeline.context)
            if why:
                raise ModelError(f"{source}: its outputs on {frame} do not read as the ssd layout: {why}")
        return roles, _batch_that_runs(backend, pipeline, prepared, min(max_batch, backend.max_batch))
    finally:
        backend.deactivate()


def _ort_reason(exc: BaseException) -> str:
    """onnxruntime's load error in one line, without the path it opened (the staging copy) or
    the C++ source location and signature it prefixes: "Unsupported model IR version: 99, max
    supported IR version: 14"."""
    text = re.sub(r"^.*?Load model from .*? failed:", "", str(exc), flags=re.S).strip()
    text = re.sub(r"^\S+:\d+ .*?\) (?=[A-Z])", "", text, flags=re.S)
    return " ".join(text.split())


def _check_finite(source: Path, frame: str, decoder: LayoutDecoder, outputs: Mapping[str, NDArray[Any]],
                  roles: Mapping[str, str]) -> None:
    """ModelError if the boxes, scores, ... the decoder reads are all NaN / Inf on the probe
    frame (a broken export or diverged weights: such a model used to import and then serve no
    detection, or NaN boxes, to every frame); a warning if some are."""
    dead = []
    for part, (role, values) in decoder.parts(outputs).items():
        if values.size == 0 or not np.issubdtype(values.dtype, np.floating):
            continue
        bad = values.size - int(np.count_nonzero(np.isfinite(values)))
        if bad == values.size:
            dead.append(f"{part} (output {roles[role]!r})")
        elif bad:
            log.warning("%s: %d of the %d values of its %s (output %r) are NaN/Inf on %s: the detections read from "
                        "them will be missing or wrong", source, bad, values.size, part, roles[role], frame)
    if dead:
        raise ModelError(f"{source}: every value of its {' and '.join(dead)} is NaN/Inf on {frame}: no detection "
                         "can be read from it; check the export and the weights")


def _batch_that_runs(backend: Backend, pipeline: FramePipeline, prepared: Prepared, batch: int) -> int:
    """``batch`` if that many copies of the probe frame go through the model and the decoder
    frame by frame, else 1 (with a warning).

    A graph can declare a dynamic batch and still run only at batch 1 (a reshape to a fixed
    shape, an output without the batch's axis); recorded with the default max batch, a server
    failed to start (its warm-up runs the max batch) or answered only the first frame of each
    batch. With max batch 1 it serves the model one frame at a time. (A fixed batch is 1 here,
    as ``read_onnx`` refuses a larger one: only a dynamic batch is ever tried above 1.)"""
    from perception.pipeline import frame_outputs

    if batch <= 1:
        return 1
    try:
        out = backend.infer(pipeline.to_batch([prepared.tensor] * batch))
        for i in range(batch):
            pipeline.finish(frame_outputs(out, i), prepared)
    except (ModelError, ValueError, IndexError) as exc:
        log.warning("the model's batch axis is dynamic, but a batch of %d frames does not go through it and the %s "
                    "decoder; recording max batch 1, so servers run it one frame at a time (re-export it with a "
                    "working dynamic batch axis to batch frames): %s", batch, pipeline.postprocess.output_layout,
                    str(exc).strip())
        return 1
    return batch
