"""INT8 Q/DQ and FP16 conversion on a tiny real detector, calibrated on rendered road scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from build_engine.model.detector import Detector, HeadLevel
from perception.errors import ModelError

W, H = 128, 96


def _tiny_detector() -> Detector:
    from build_engine.model import build_detector, preset

    torch.manual_seed(0)
    model = build_detector(preset("pico", input_width=W, input_height=H))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    for head in model.heads:
        assert isinstance(head, HeadLevel)
        nn.init.normal_(head.box_pred.weight, std=0.05)
        for conv in (head.obj_pred, head.cls_pred):
            assert conv.bias is not None
            nn.init.normal_(conv.weight, std=0.3)
            nn.init.constant_(conv.bias, 0.0)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from build_engine.calibration import list_images
    from build_engine.data.generate import generate_dataset
    from build_engine.export import export_onnx
    from build_engine.fold import fold_batchnorm
    from perception.manifest import PreprocessSpec

    tmp = tmp_path_factory.mktemp("quant")
    model = _tiny_detector()
    fp32 = export_onnx(fold_batchnorm(model)[0], tmp / "fp32.onnx", (H, W))
    data = generate_dataset(tmp / "calib", 6, seed=1, width=320, height=180)
    spec = PreprocessSpec(input_width=W, input_height=H)
    return {"tmp": tmp, "fp32": fp32, "images": list_images(Path(data)), "spec": spec}


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    from server.runtime.onnxruntime_backend import OnnxRuntimeBackend

    b = OnnxRuntimeBackend(path, intra_op_threads=1)
    b.activate()
    return b.infer(x)["output"]


def test_int8_qdq_structure_and_accuracy(setup):
    import onnx

    from build_engine.calibration import ImageCalibrationReader, iter_batches
    from build_engine.export import op_types
    from build_engine.quantize import count_qdq, quantize_int8

    reader = ImageCalibrationReader(setup["images"], setup["spec"])
    res = quantize_int8(setup["fp32"], setup["tmp"] / "int8.onnx", reader, "minmax")
    counts = count_qdq(res.path)
    assert counts["QuantizeLinear"] > 20 and counts["DequantizeLinear"] > 20
    ops = op_types(res.path)
    assert "BatchNormalization" not in ops and "QLinearConv" not in ops  # explicit Q/DQ, not QOperator
    proto = onnx.load(str(res.path))
    inits = {i.name: i for i in proto.graph.initializer}
    # Per-channel weights: the weight scales are vectors, one per output channel.
    w_scales = [inits[n.input[1]] for n in proto.graph.node
                if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]
    assert w_scales and all(len(s.dims) == 1 and s.dims[0] > 1 for s in w_scales)
    # U8 activations (docs/performance.md), S8 weights.
    act_zp = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert {z.data_type for z in act_zp} == {onnx.TensorProto.UINT8}
    # The decode and the prediction convs stay FP32.
    assert any("Exp" in n for n in res.excluded_nodes) and sum("pred" in n for n in res.excluded_nodes) == 9
    assert any("stem" in n for n in res.excluded_nodes)  # 3-channel conv: slower in INT8
    x = next(iter_batches(setup["images"][:2], setup["spec"], 2))
    ref, out = _run(setup["fp32"], x), _run(res.path, x)
    assert out.shape == ref.shape
    corr = np.corrcoef(ref[..., 4:].ravel(), out[..., 4:].ravel())[0, 1]
    assert corr > 0.95, corr
    assert np.abs(ref[..., :4] - out[..., :4]).mean() < 0.05 * W  # boxes within a few px on average


def test_tensorrt_target_is_signed_symmetric_and_runs(setup):
    """TensorRT's explicit quantization takes INT8 Q/DQ with zero points of 0 and no INT32
    biases: the TensorRT target must produce exactly that, and still compute the model."""
    import onnx

    from build_engine.calibration import ImageCalibrationReader, iter_batches
    from build_engine.quantize import quantize_int8

    reader = ImageCalibrationReader(setup["images"], setup["spec"])
    res = quantize_int8(setup["fp32"], setup["tmp"] / "int8.trt.onnx", reader, "percentile", target="tensorrt")
    proto = onnx.load(str(res.path))
    inits = {i.name: i for i in proto.graph.initializer}
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 40
    for n in qdq:
        zp = inits[n.input[2]]
        assert zp.data_type == onnx.TensorProto.INT8, n.name
        assert not np.any(onnx.numpy_helper.to_array(zp)), f"{n.name}: zero point must be 0 for TensorRT"
    dq_inputs = [inits[n.input[0]] for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert dq_inputs and {t.data_type for t in dq_inputs} == {onnx.TensorProto.INT8}  # weights only; biases stay FP32
    conv_bias = [n.input[2] for n in proto.graph.node if n.op_type == "Conv" and len(n.input) > 2]
    assert conv_bias and all(b in inits and inits[b].data_type == onnx.TensorProto.FLOAT for b in conv_bias)
    x = next(iter_batches(setup["images"][:2], setup["spec"], 2))
    ref, out = _run(setup["fp32"], x), _run(res.path, x)
    corr = np.corrcoef(ref[..., 4:].ravel(), out[..., 4:].ravel())[0, 1]
    assert corr > 0.95, corr
    with pytest.raises(ModelError, match="unknown quantization target"):
        quantize_int8(setup["fp32"], setup["tmp"] / "x.onnx", ImageCalibrationReader(setup["images"], setup["spec"]),
                      target="tflite")


def test_calibrators_choose_different_ranges(setup):
    from build_engine.calibration import ImageCalibrationReader, qdq_ranges
    from build_engine.export import export_onnx
    from build_engine.quantize import quantize_int8

    # A small conv net keeps the histogram calibrators' per-tensor search cheap.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 8, 1)).eval()
    small = export_onnx(net, setup["tmp"] / "small.onnx", (H, W))
    highs = {}
    for cal in ("minmax", "percentile", "entropy"):
        reader = ImageCalibrationReader(setup["images"], setup["spec"])
        res = quantize_int8(small, setup["tmp"] / f"{cal}.onnx", reader, cal, exclude=[])
        ranges = qdq_ranges(res.path)
        acts = sorted(k for k, r in ranges.items() if r.kind == "activation" and k != "images")
        highs[cal] = np.array([ranges[k].hi for k in acts])
    # Min-max covers everything seen; the histogram calibrators clip the tails.
    assert np.all(highs["percentile"] <= highs["minmax"] * 1.01)  # (up to one histogram bin)
    assert np.mean(highs["percentile"]) < np.mean(highs["minmax"])
    assert not np.allclose(highs["entropy"], highs["minmax"])


def test_fp16_keeps_fp32_io_and_matches(setup):
    import onnx

    from build_engine.calibration import iter_batches
    from build_engine.quantize import convert_fp16

    path = convert_fp16(setup["fp32"], setup["tmp"] / "fp16.onnx")
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    x = next(iter_batches(setup["images"][:2], setup["spec"], 2))
    ref, out = _run(setup["fp32"], x), _run(path, x)
    assert np.abs(ref[..., 4:] - out[..., 4:]).max() < 0.02
    assert path.stat().st_size < 0.7 * setup["fp32"].stat().st_size


def test_empty_calibration_set(setup, tmp_path):
    from build_engine.calibration import ImageCalibrationReader, list_images
    from perception.errors import DataError

    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="empty"):
        list_images(tmp_path)
    with pytest.raises(DataError, match="empty"):
        ImageCalibrationReader([], setup["spec"])


def test_calibration_hash_identifies_content(setup, tmp_path):
    import shutil

    from build_engine.calibration import calibration_set_hash

    imgs = setup["images"][:3]
    h = calibration_set_hash(imgs)
    assert h == calibration_set_hash(list(reversed(imgs)))
    assert h != calibration_set_hash(imgs[:2])
    copy = [Path(shutil.copy(p, tmp_path / p.name)) for p in imgs]
    copy[0].write_bytes(copy[0].read_bytes() + b"\0")
    assert calibration_set_hash(copy) != h


def test_fake_quant_and_sqnr():
    from build_engine.calibration import fake_quant, sqnr_db

    x = np.linspace(0, 1, 1001)
    assert sqnr_db(x, fake_quant(x, 0.0, 1.0)) > 40
    # A range far wider than the data wastes levels; a clipped one saturates: both lose.
    assert sqnr_db(x, fake_quant(x, 0.0, 6.0)) < sqnr_db(x, fake_quant(x, 0.0, 1.0))
    assert sqnr_db(x, fake_quant(x, 0.0, 0.5)) < 10
