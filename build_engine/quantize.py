"""Reduced precision: INT8 as explicit Q/DQ ONNX, and FP16.

INT8 (``quantize_int8``): onnxruntime's static quantizer in QDQ format (QuantizeLinear /
DequantizeLinear pairs around every quantized tensor: the form both onnxruntime and current
TensorRT consume), per-channel symmetric INT8 weights, **U8 activations** (docs/performance.md: S8
activations make SiLU / Hardswish models ~1.9x *slower* than FP32 on this CPU, U8 never did), ranges
fitted by a selectable calibrator on real images (``build_engine.calibration``).

The stem stays FP32 for speed (``slow_int8_nodes``). The sensitive tail stays FP32
(``sensitive_nodes``): the head's prediction convs and the box decode after them. The decode
turns grid offsets into pixel coordinates up to the input width; 8 bits over [0, 512] px is a
2 px step, which costs far more mAP than the few MACs it would save.

FP16 (``convert_fp16``): weights and activations in half precision with FP32 graph IO, the
decode kept in FP32 for the same reason. On a CPU this is a size win, not a speed win; it
is meant for GPUs / TensorRT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from build_engine.calibration import ImageCalibrationReader, as_ort_reader, calibration_method
from build_engine.export import save_onnx
from perception.errors import DataError, ModelError

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Options of onnxruntime's calibrators, all with asymmetric ranges (U8 activations).
# Percentile keeps 99.99 % of the activation mass (the default 99.999 clips almost nothing
# on post-ReLU maps). Entropy: onnxruntime's default 128 bins = 128 quantized bins leaves one
# candidate threshold (the full range, min-max in disguise); 512 bins give 193 candidates.
#
# Measured on the default detector (epoch-4 checkpoint, 300 val images, 48 calibration images):
# mAP50-95 FP32 39.65; min-max 39.75; percentile 38.87; entropy 19.23 with 99.9 % of the FP32
# detections gone. onnxruntime's KL search runs on a histogram symmetric around zero, so on
# post-ReLU maps it settles at 0.25-0.5x of the observed range and clips the sparse large
# activations that carry the detections (1024 bins / 256 quantized bins: 17.1 mAP, 108 s). The
# gate catches it; min-max stays the default.
CALIBRATOR_OPTIONS: dict[str, dict[str, object]] = {
    "minmax": {"symmetric": False},
    "percentile": {"symmetric": False, "num_bins": 2048, "percentile": 99.99},
    "entropy": {"symmetric": False, "num_bins": 512, "num_quantized_bins": 128},
}
# For the TensorRT target (signed INT8, zero point 0), ranges are symmetric around zero, so a
# post-ReLU map gets 128 levels instead of 256, and the outliers min-max keeps cost more.
# Measured on the shipped default (300 val images, 48 calibration images, FP32 64.52):
# min-max 63.31, percentile 99.9 % 58.04, 99.99 % 63.65, 99.999 % 63.99 (stem in FP32 then).
SYMMETRIC_CALIBRATOR_OPTIONS: dict[str, dict[str, object]] = {
    "minmax": {"symmetric": True},
    "percentile": {"symmetric": True, "num_bins": 2048, "percentile": 99.999},
    "entropy": {"symmetric": True, "num_bins": 512, "num_quantized_bins": 128},
}


QUANT_TARGETS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    excluded_nodes: tuple[str, ...]
    calibrator: str
    num_calibration_batches: int


def name_nodes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a unique name (the quantizer addresses nodes by name)."""
    used = {n.name for n in proto.graph.node if n.name}
    for i, n in enumerate(proto.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)
    return proto


def _reaches_weighted(proto: onnx.ModelProto) -> dict[str, bool]:
    """node name -> whether some weighted op is downstream of the node's outputs."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    memo: dict[str, bool] = {}

    def reach(node: onnx.NodeProto) -> bool:
        if node.name in memo:
            return memo[node.name]
        memo[node.name] = False  # graphs are acyclic; this guards malformed input only
        result = False
        for t in node.output:
            for c in consumers.get(t, []):
                if c.op_type in WEIGHTED_OPS or reach(c):
                    result = True
                    break
            if result:
                break
        memo[node.name] = result
        return result

    return {n.name: reach(n) for n in proto.graph.node}


def sensitive_nodes(proto: onnx.ModelProto, include_prediction_convs: bool = True) -> list[str]:
    """Names of the tail nodes to keep in FP32: every node with no weighted op downstream
    (the decode), and optionally the last weighted ops themselves (the prediction convs)."""
    name_nodes(proto)
    reach = _reaches_weighted(proto)
    out = []
    for n in proto.graph.node:
        if reach[n.name]:
            continue
        if n.op_type in WEIGHTED_OPS and not include_prediction_convs:
            continue
        out.append(n.name)
    return out


def selection_nodes(proto: onnx.ModelProto) -> list[str]:
    """In a model that selects inside its graph (NonMaxSuppression: the two-stage family's
    proposals), the arithmetic between the stages: every node outside a named module (the
    exporter names module ops ``/module/.../Op``, functional glue ``/Op_N``), MatMuls of two
    activations (RoIAlign's sampling products), the prediction convs (``*_pred``) whose
    outputs become boxes and scores, and the proposal network (``/rpn``: INT8 objectness moves
    which proposals survive). Measured on the shipped two-stage model (100 val images, minmax):
    quantizing everything cost 10.0 mAP50-95 points, keeping the glue and MatMuls in FP32 1.7,
    and the proposal network as well 0.2, at the same latency (0.55x FP32)."""
    if not any(n.op_type == "NonMaxSuppression" for n in proto.graph.node):
        return []
    name_nodes(proto)
    inits = {i.name for i in proto.graph.initializer}
    out = []
    for n in proto.graph.node:
        if n.name.count("/") <= 1 or n.name.startswith("/rpn"):
            out.append(n.name)
        elif n.op_type in WEIGHTED_OPS:
            two_activations = n.op_type == "MatMul" and not any(i in inits for i in n.input)
            if two_activations or "_pred/" in n.name:
                out.append(n.name)
    return out


def slow_int8_nodes(proto: onnx.ModelProto, min_in_channels: int = 8) -> list[str]:
    """Convolutions with fewer than ``min_in_channels`` input channels per group (the stem
    reading the 3-channel image): their INT8 kernels underfill the SIMD dot products, and the
    image would need a QuantizeLinear of its own. Measured on this CPU (nano, 512x288, 1
    thread, per-node median): the stem took 740 us in INT8 vs 406 us in FP32 (1.8x slower),
    and quantizing it made the whole model 0.88x FP32 instead of 0.75x without it."""
    inits = {i.name: i for i in proto.graph.initializer}
    out = []
    for n in proto.graph.node:
        if (n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits
                and inits[n.input[1]].dims[1] < min_in_channels):
            out.append(n.name)
    return out


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    reader: ImageCalibrationReader,
    calibrator: str = "minmax",
    exclude: Sequence[str] | None = None,
    per_channel: bool = True,
    target: str = "onnxruntime",
) -> QuantizeResult:
    """Write a QDQ INT8 model of ``fp32_path`` to ``out_path``.

    exclude: node names to keep in FP32; default ``sensitive_nodes`` (head tail + decode) and,
    for onnxruntime, ``slow_int8_nodes`` (the stem).
    target: ``onnxruntime`` (U8 activations with a fitted zero point, INT32 biases: fastest on
    this CPU) or ``tensorrt``, whose explicit quantization takes signed INT8 only, with every
    zero point 0: symmetric S8 activation ranges, biases left in FP32 (TensorRT fuses them
    into the convolution itself), ReLU kept as a node.
    Raises DataError for an empty calibration set, ModelError if quantization fails.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(reader) == 0:
        raise DataError("calibration set is empty")
    if target not in QUANT_TARGETS:
        raise ModelError(f"unknown quantization target {target!r}; choose one of {sorted(QUANT_TARGETS)}")
    symmetric = target == "tensorrt"
    method = calibration_method(calibrator)
    with tempfile.TemporaryDirectory(prefix="quant_") as tmp:
        prepped = Path(tmp) / "prep.onnx"
        try:
            # Shape inference + graph optimisation first, as onnxruntime recommends for QDQ.
            quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
        except Exception as exc:
            raise ModelError(f"quantization pre-processing failed: {exc}") from exc
        proto = name_nodes(onnx.load(str(prepped)))
        onnx.save(proto, str(prepped))
        # The stem stays FP32 for onnxruntime's speed on this CPU only; TensorRT gets it in INT8
        # (measured on the shipped default: mAP50-95 63.89, vs 63.99 with the stem in FP32).
        excluded = list(exclude) if exclude is not None else sensitive_nodes(proto) + selection_nodes(proto) + (
            slow_int8_nodes(proto) if not symmetric else [])
        known = {n.name for n in proto.graph.node}
        excluded = [n for n in excluded if n in known]
        staged = Path(tmp) / "int8.onnx"
        cache = Path(tmp) / "ranges.json"
        try:
            # Calibrate here rather than inside quantize_static: it does not pass the bin counts
            # through, and its percentile calibrator defaults to a *symmetric* range, which
            # wastes half of the U8 levels on post-ReLU maps that are never negative.
            def calibrate(name: str) -> None:
                calib = create_calibrator(
                    prepped, None, augmented_model_path=str(Path(tmp) / f"augmented-{name}.onnx"),
                    calibrate_method=calibration_method(name),
                    extra_options=(SYMMETRIC_CALIBRATOR_OPTIONS if symmetric else CALIBRATOR_OPTIONS)[name],
                )
                with contextlib.redirect_stdout(sys.stderr):  # the histogram calibrators print progress
                    calib.collect_data(as_ort_reader(reader))
                    save_tensors_data(calib.compute_data(), cache)

            try:
                calibrate(calibrator)
            except ValueError as exc:
                # numpy refuses a histogram of a tensor whose whole range is narrower than its
                # bins can resolve (a near-constant map; seen on an untrained pruned model), and
                # onnxruntime's histogram collector cannot stack a tensor whose shape changes
                # from image to image (a two-stage model's proposals).
                if calibrator == "minmax" or not ("bins" in str(exc) or "inhomogeneous" in str(exc)):
                    raise
                log.warning("%s calibration failed (%s); falling back to minmax", calibrator, exc)
                calibrator, method = "minmax", calibration_method("minmax")
                reader.rewind()
                calibrate(calibrator)
            quantize_static(
                str(prepped),
                str(staged),
                as_ort_reader(reader),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                calibrate_method=method,
                extra_options={
                    "ActivationSymmetric": symmetric, "WeightSymmetric": True, "QuantizeBias": not symmetric,
                },
                calibration_cache_path=cache,
            )
        except DataError:
            raise
        except Exception as exc:
            raise ModelError(f"INT8 quantization failed: {exc}") from exc
        save_onnx(onnx.load(str(staged)), out_path)
    log.info("INT8 (%s, for %s) -> %s, %d nodes kept in FP32", calibrator, target, Path(out_path).name, len(excluded))
    return QuantizeResult(Path(out_path), tuple(excluded), calibrator, len(reader))


def convert_fp16(fp32_path: Path, out_path: Path, keep_fp32: Sequence[str] | None = None) -> Path:
    """Write an FP16 copy of ``fp32_path`` with FP32 inputs/outputs; the decode (and a
    two-stage model's proposal selection, ``selection_nodes``) stays FP32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = name_nodes(onnx.load(str(fp32_path)))
    block = list(keep_fp32) if keep_fp32 is not None else (
        sensitive_nodes(proto, include_prediction_convs=False) + selection_nodes(proto))
    try:
        half = topo_sort(convert_float_to_float16(proto, keep_io_types=True, node_block_list=block))
        onnx.checker.check_model(half)
    except Exception as exc:
        raise ModelError(f"FP16 conversion failed: {exc}") from exc
    return save_onnx(half, out_path)


def topo_sort(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Order the graph's nodes topologically (the FP16 converter appends its IO casts last)."""
    available = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer} | {""}
    pending = list(proto.graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(t in available for t in n.input)]
        if not ready:
            raise ModelError("graph has a cycle or an undefined input; cannot sort it")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    sorted_nodes = [type(ordered[0])()] * 0
    for n in ordered:
        copy = type(n)()
        copy.CopyFrom(n)
        sorted_nodes.append(copy)
    del proto.graph.node[:]
    proto.graph.node.extend(sorted_nodes)
    return proto


def count_qdq(path: str | os.PathLike[str]) -> dict[str, int]:
    """Counts of QuantizeLinear / DequantizeLinear nodes (a Q/DQ model has both)."""
    import onnx

    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0}
    for n in onnx.load(str(path)).graph.node:
        if n.op_type in counts:
            counts[n.op_type] += 1
    return counts
