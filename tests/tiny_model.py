"""A tiny, real ONNX detector built inline with onnx.helper (no torch), for plumbing tests.

Input ``images`` (B, 3, H, W) float32; output (B, N, 5 + C) in the ``yolo_obj`` layout:
a strided conv gives one candidate per 8x8 cell; x1 y1 come from a sigmoid scaled to the
input size, width/height from a sigmoid scaled to a quarter of it, then obj and class
probabilities through a sigmoid. Random weights, seeded: detections are meaningless but
well-formed, and vary with the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from perception.manifest import (
    Manifest,
    PostprocessSpec,
    Precision,
    PreprocessSpec,
    Variant,
    save_manifest,
    sha256_file,
)

CLASSES = ("car", "truck", "bus", "pedestrian", "cyclist", "traffic_light", "traffic_sign")


def make_tiny_onnx(
    path: Path, width: int = 64, height: int = 48, num_classes: int = len(CLASSES), seed: int = 0
) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c = 5 + num_classes
    w = (rng.standard_normal((c, 3, 8, 8)) * 0.5).astype(np.float32)
    b = np.zeros(c, np.float32)
    w[4] *= 0.05
    b[4] = 2.0  # objectness leans positive so some candidates pass a threshold
    scale_xy = np.array([width, height], np.float32).reshape(1, 1, 2)
    scale_wh = np.array([width / 4, height / 4], np.float32).reshape(1, 1, 2)
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(np.array([0, c, -1], np.int64), "shape"),
        numpy_helper.from_array(scale_xy, "scale_xy"),
        numpy_helper.from_array(scale_wh, "scale_wh"),
        numpy_helper.from_array(np.array([2, 2, c - 4], np.int64), "split"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "W", "B"], ["conv"], strides=[8, 8]),
        helper.make_node("Reshape", ["conv", "shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["cand"], perm=[0, 2, 1]),
        helper.make_node("Sigmoid", ["cand"], ["sig"]),
        helper.make_node("Split", ["sig", "split"], ["xy", "wh", "rest"], axis=2),
        helper.make_node("Mul", ["xy", "scale_xy"], ["x1y1"]),
        helper.make_node("Mul", ["wh", "scale_wh"], ["bwh"]),
        helper.make_node("Add", ["x1y1", "bwh"], ["x2y2"]),
        helper.make_node("Concat", ["x1y1", "x2y2", "rest"], ["output"], axis=2),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, height, width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", None, c])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_tiny_artifact(directory: Path, width: int = 64, height: int = 48, max_batch: int = 8) -> Path:
    """Write a tiny ONNX model and its manifest into ``directory``; return the manifest path."""
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / "model.fp32.onnx"
    make_tiny_onnx(onnx_path, width, height)
    manifest = Manifest(
        name="tiny",
        version="0.0.1",
        classes=CLASSES,
        preprocess=PreprocessSpec(input_width=width, input_height=height),
        postprocess=PostprocessSpec(score_threshold=0.3, iou_threshold=0.5, max_detections=50),
        variants=(
            Variant(
                name="fp32",
                file=onnx_path.name,
                precision=Precision.FP32,
                sha256=sha256_file(onnx_path),
                input_shape=(-1, 3, height, width),
                max_batch=max_batch,
            ),
        ),
        default_variant="fp32",
        provenance={"source": "tests/tiny_model.py"},
    )
    return save_manifest(manifest, directory)
