"""The project's detector with NMS inside its graph, in the ``nms_detections`` layout.

Appends ONNX ``NonMaxSuppression`` (per class, as TensorRT's EfficientNMS does) to a ``yolo_obj``
model and gathers its selections into the outputs post-NMS detectors export:
``num_dets (1, 1)``, ``det_boxes (1, K, 4)`` x1 y1 x2 y2 in model-input pixels,
``det_scores (1, K)`` and ``det_classes (1, K)``. Batch 1 (the selection is per image), which
the server's runtime serves by running one frame per call. Used to show that a post-NMS model
and the server's own NMS give the same detections, and as an export for runtimes that want NMS
in the graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from perception.errors import ModelError


def export_nms_detections(
    src: Path, out: Path, iou_threshold: float, score_threshold: float, max_per_class: int
) -> Path:
    """Write ``out``: the ``yolo_obj`` ONNX model ``src`` with NMS and gathers appended."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    if len(g.output) != 1:
        raise ModelError(f"{src}: expected one yolo_obj output, the model has {len(g.output)}")
    raw = g.output[0].name
    dim0 = g.input[0].type.tensor_type.shape.dim[0]
    dim0.Clear()
    dim0.dim_value = 1  # the selection below is per image
    consts: dict[str, np.ndarray] = {
        "nd_s0": np.array([0], np.int64), "nd_s4": np.array([4], np.int64), "nd_s5": np.array([5], np.int64),
        "nd_big": np.array([np.iinfo(np.int64).max], np.int64), "nd_axis2": np.array([2], np.int64),
        "nd_axis0": np.array([0], np.int64), "nd_one": np.array([1], np.int64), "nd_two": np.array([2], np.int64),
        "nd_flat": np.array([-1], np.int64),
        "nd_max": np.array([max_per_class], np.int64), "nd_iou": np.array([iou_threshold], np.float32),
        "nd_score": np.array([score_threshold], np.float32),
    }
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    node = helper.make_node
    g.node.extend([
        node("Slice", [raw, "nd_s0", "nd_s4", "nd_axis2"], ["nd_boxes"]),  # (1, N, 4)
        node("Slice", [raw, "nd_s4", "nd_s5", "nd_axis2"], ["nd_obj"]),  # (1, N, 1)
        node("Slice", [raw, "nd_s5", "nd_big", "nd_axis2"], ["nd_cls"]),  # (1, N, C)
        node("Mul", ["nd_obj", "nd_cls"], ["nd_scores_bnc"]),
        node("Transpose", ["nd_scores_bnc"], ["nd_scores"], perm=[0, 2, 1]),  # (1, C, N)
        node("NonMaxSuppression", ["nd_boxes", "nd_scores", "nd_max", "nd_iou", "nd_score"], ["nd_sel"],
             center_point_box=0),  # (K, 3): batch, class, box
        node("Gather", ["nd_sel", "nd_one"], ["nd_cls_k1"], axis=1),
        node("Gather", ["nd_sel", "nd_two"], ["nd_box_k1"], axis=1),
        node("Squeeze", ["nd_cls_k1", "nd_one"], ["nd_cls_k"]),  # (K,)
        node("Squeeze", ["nd_box_k1", "nd_one"], ["nd_box_k"]),
        node("Squeeze", ["nd_boxes", "nd_axis0"], ["nd_boxes0"]),  # (N, 4)
        node("Gather", ["nd_boxes0", "nd_box_k"], ["nd_boxes_k"], axis=0),  # (K, 4)
        node("Shape", ["nd_boxes0"], ["nd_shape"]),
        node("Slice", ["nd_shape", "nd_s0", "nd_one"], ["nd_n"]),  # (1,) = N
        node("Mul", ["nd_cls_k", "nd_n"], ["nd_row"]),
        node("Add", ["nd_row", "nd_box_k"], ["nd_flat_k"]),  # class * N + box
        node("Reshape", ["nd_scores", "nd_flat"], ["nd_scores_flat"]),
        node("Gather", ["nd_scores_flat", "nd_flat_k"], ["nd_scores_k"], axis=0),  # (K,)
        node("Shape", ["nd_sel"], ["nd_sel_shape"]),
        node("Slice", ["nd_sel_shape", "nd_s0", "nd_one"], ["nd_k"]),  # (1,) = K
        node("Unsqueeze", ["nd_k", "nd_axis0"], ["num_dets"]),  # (1, 1)
        node("Unsqueeze", ["nd_boxes_k", "nd_axis0"], ["det_boxes"]),
        node("Unsqueeze", ["nd_scores_k", "nd_axis0"], ["det_scores"]),
        node("Unsqueeze", ["nd_cls_k", "nd_axis0"], ["det_classes"]),
    ])
    del g.output[:]
    g.output.extend([
        helper.make_tensor_value_info("num_dets", TensorProto.INT64, [1, 1]),
        helper.make_tensor_value_info("det_boxes", TensorProto.FLOAT, [1, None, 4]),
        helper.make_tensor_value_info("det_scores", TensorProto.FLOAT, [1, None]),
        helper.make_tensor_value_info("det_classes", TensorProto.INT64, [1, None]),
    ])
    try:
        onnx.checker.check_model(m)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"model with in-graph NMS is invalid: {exc}") from exc
    onnx.save(m, str(out))
    return out
