"""ONNX export: an eval-mode detector -> opset >= 17, dynamic batch, simplified ONNX file.

The exported graph has one input ``images`` (batch, 3, H, W) float32 and one output
``output`` (batch, N, 5 + C) in the ``yolo_obj`` layout the server decodes. Other families
name their outputs themselves: a model with ``output_names`` (e.g. ``("boxes", "scores")`` for
the ``ssd`` layout) exports every output under those names, and ``export_batch`` (e.g. 1 for
the two-stage family, whose in-graph proposal selection is per image) fixes the batch axis. An optional
in-graph NMS (``append_nms``) adds a second output ``selected_indices`` (K, 3) int64 rows of
(batch index, class id, candidate index), ONNX ``NonMaxSuppression`` semantics, for runtimes
that want NMS inside the engine; the ``output`` tensor stays, so the server can ignore it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from perception.errors import ModelError

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

MIN_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "output"


class _FirstOutput(nn.Module):
    """Export wrapper: a detector that returns a tuple/list exports only its first tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    input_hw: tuple[int, int],
    opset: int = MIN_OPSET,
    simplify: bool = True,
) -> Path:
    """Export ``model`` (eval mode, CPU) to ``path``; return the path.

    input_hw: (height, width) of the model input in pixels. The batch axis is dynamic.
    Raises ModelError if tracing, simplification or the ONNX checker fails.
    """
    import onnx

    if opset < MIN_OPSET:
        raise ModelError(f"opset must be >= {MIN_OPSET}, got {opset}")
    h, w = input_hw
    out_path = Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    names = tuple(getattr(model, "output_names", (OUTPUT_NAME,)))
    fixed_batch = getattr(model, "export_batch", None)
    wrapped = (model if len(names) > 1 else _FirstOutput(model)).eval().cpu()
    # batch 2 so no batch-1 special case gets traced in (unless the family fixes the batch)
    dummy = torch.zeros(fixed_batch or 2, 3, h, w)
    dynamic = {} if fixed_batch else {n: {0: "batch"} for n in (INPUT_NAME, *names)}
    with tempfile.TemporaryDirectory(prefix="export_") as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(
                    wrapped,
                    (dummy,),
                    str(raw),
                    dynamo=False,  # the dynamo exporter needs onnxscript, not installed
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=list(names),
                    dynamic_axes=dynamic or None,
                    do_constant_folding=True,
                )
            proto = onnx.load(str(raw))
        except Exception as exc:  # the exporter raises many untyped errors
            raise ModelError(f"ONNX export failed: {exc}") from exc
    if simplify:
        proto = simplify_onnx(proto)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"exported ONNX model is invalid: {exc}") from exc
    save_onnx(proto, out_path)
    log.info("exported %s (opset %d, %d nodes)", out_path.name, opset, len(proto.graph.node))
    return out_path


def simplify_onnx(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold and clean the graph with onnxslim; the batch axis stays symbolic."""
    try:
        import onnxslim
    except ImportError as exc:  # pragma: no cover - an install problem
        raise ModelError("onnxslim is not installed (pip install 'perception[build]')") from exc
    try:
        return onnxslim.slim(proto)
    except Exception as exc:
        raise ModelError(f"onnxslim failed to simplify the model: {exc}") from exc


def save_onnx(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``proto`` to ``path`` atomically (single file, no external data)."""
    import onnx

    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + p.name, suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the server may run as another user
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def op_types(path_or_proto: str | os.PathLike[str] | onnx.ModelProto) -> list[str]:
    """The op type of every node in the graph, in order."""
    import onnx

    proto = path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else onnx.load(str(path_or_proto))
    return [n.op_type for n in proto.graph.node]


def append_nms(
    proto: onnx.ModelProto,
    iou_threshold: float,
    score_threshold: float,
    max_per_class: int,
) -> onnx.ModelProto:
    """A copy of an ``yolo_obj`` model with ONNX NonMaxSuppression appended.

    Adds output ``selected_indices`` (K, 3) int64: (batch, class, candidate) per kept box,
    with score = objectness x class probability, per-class NMS, corners (x1 y1 x2 y2).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    out = g.output[0].name
    consts: dict[str, np.ndarray] = {
        "nms_s0": np.array([0], np.int64),
        "nms_s4": np.array([4], np.int64),
        "nms_s5": np.array([5], np.int64),
        "nms_big": np.array([np.iinfo(np.int64).max], np.int64),
        "nms_axis": np.array([2], np.int64),
        "nms_max": np.array([max_per_class], np.int64),
        "nms_iou": np.array([iou_threshold], np.float32),
        "nms_score": np.array([score_threshold], np.float32),
    }
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    g.node.extend(
        [
            helper.make_node("Slice", [out, "nms_s0", "nms_s4", "nms_axis"], ["nms_boxes"]),
            helper.make_node("Slice", [out, "nms_s4", "nms_s5", "nms_axis"], ["nms_obj"]),
            helper.make_node("Slice", [out, "nms_s5", "nms_big", "nms_axis"], ["nms_cls"]),
            helper.make_node("Mul", ["nms_obj", "nms_cls"], ["nms_scores_bnc"]),
            helper.make_node("Transpose", ["nms_scores_bnc"], ["nms_scores"], perm=[0, 2, 1]),
            helper.make_node(
                "NonMaxSuppression",
                ["nms_boxes", "nms_scores", "nms_max", "nms_iou", "nms_score"],
                ["selected_indices"],
                center_point_box=0,
            ),
        ]
    )
    g.output.append(helper.make_tensor_value_info("selected_indices", TensorProto.INT64, [None, 3]))
    try:
        onnx.checker.check_model(m)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"model with in-graph NMS is invalid: {exc}") from exc
    return m
