"""ONNX export: opset, dynamic batch, simplification, parity with torch, in-graph NMS, and the
fast FP32 artifact other components' tests use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from build_engine.model.detector import Detector, HeadLevel


def _tiny_detector(seed: int = 0) -> Detector:
    from build_engine.model import build_detector, preset

    torch.manual_seed(seed)
    model = build_detector(preset("pico", input_width=128, input_height=96))
    for m in model.modules():  # variance-preserving init, so the untrained head is not constant
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    for head in model.heads:
        assert isinstance(head, HeadLevel)
        assert head.obj_pred.bias is not None and head.cls_pred.bias is not None
        nn.init.normal_(head.box_pred.weight, std=0.05)
        nn.init.normal_(head.obj_pred.weight, std=0.5)
        nn.init.constant_(head.obj_pred.bias, 0.0)
        nn.init.normal_(head.cls_pred.weight, std=0.5)
        nn.init.constant_(head.cls_pred.bias, 0.0)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from build_engine.checkpoint import meta_for, save_checkpoint

    model = _tiny_detector()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "detector.pt", model, meta_for(model))


def test_export_opset_dynamic_batch_and_parity(tmp_path):
    import onnx

    from build_engine.export import export_onnx, op_types
    from build_engine.fold import fold_batchnorm
    from server.runtime.onnxruntime_backend import OnnxRuntimeBackend

    model = _tiny_detector()
    folded, _ = fold_batchnorm(model)
    path = export_onnx(folded, tmp_path / "m.onnx", (96, 128), opset=17)
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert "BatchNormalization" not in op_types(proto)
    backend = OnnxRuntimeBackend(path, intra_op_threads=1)
    backend.activate()
    rng = np.random.default_rng(0)
    for b in (1, 3):
        x = rng.random((b, 3, 96, 128), dtype=np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        out = backend.infer(x)["output"]
        assert out.shape == ref.shape == (b, (12 * 16 + 6 * 8 + 3 * 4), 12)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_export_rejects_old_opset(tmp_path):
    from build_engine.export import export_onnx
    from perception.errors import ModelError

    with pytest.raises(ModelError):
        export_onnx(nn.Identity(), tmp_path / "m.onnx", (32, 32), opset=13)


def test_in_graph_nms_matches_server_nms(tmp_path):
    import onnx
    import onnxruntime as ort

    from build_engine.export import append_nms, export_onnx
    from build_engine.fold import fold_batchnorm
    from perception.layouts import decoder_for
    from perception.nms import batched_nms
    from perception.postprocess import PostprocessOptions

    folded, _ = fold_batchnorm(_tiny_detector())
    path = export_onnx(folded, tmp_path / "m.onnx", (96, 128))
    nms = append_nms(onnx.load(str(path)), iou_threshold=0.5, score_threshold=0.3, max_per_class=1000)
    sess = ort.InferenceSession(nms.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((2, 3, 96, 128), dtype=np.float32)
    raw, sel = sess.run(None, {"images": x})
    assert sel.shape[1] == 3 and len(sel) > 0
    opts = PostprocessOptions(score_threshold=0.3, iou_threshold=0.5, max_detections=10_000, pre_nms_topk=100_000)
    for b in range(2):
        # Per-class NMS over every (candidate, class) score >= threshold, as ONNX defines it.
        scores = raw[b, :, 4:5] * raw[b, :, 5:]
        cand, cls = np.nonzero(scores >= 0.3)
        keep = batched_nms(raw[b, cand, :4], scores[cand, cls], cls, 0.5, False)
        expected = sorted(zip(cls[keep].tolist(), cand[keep].tolist(), strict=True))
        got = sorted((int(c), int(i)) for bb, c, i in sel if bb == b)
        assert got == expected
        assert len(decoder_for("yolo_obj").candidates({"predictions": raw[b]}, opts, raw.shape[2] - 5)) > 0


def test_export_fp32_artifact_is_servable(tmp_path, tiny_ckpt):
    import time

    from build_engine.build import export_fp32_artifact
    from perception.manifest import load_manifest
    from server.runtime.onnxruntime_backend import OnnxRuntimeBackend

    t0 = time.perf_counter()
    manifest_path = export_fp32_artifact(tiny_ckpt, tmp_path / "art")
    assert time.perf_counter() - t0 < 15
    m = load_manifest(manifest_path)  # verifies sha256
    assert m.default_variant == "fp32" and m.classes[0] == "car" and len(m.classes) == 7
    v = m.variant()
    assert v.input_shape == (-1, 3, 96, 128) and v.macs > 0 and v.params > 0
    assert (m.preprocess.input_width, m.preprocess.input_height, m.preprocess.color_order) == (128, 96, "RGB")
    assert m.provenance["checkpoint"]["sha256"] and m.provenance["libraries"]["torch"]
    b = OnnxRuntimeBackend(m.path_of(v), intra_op_threads=1)
    b.activate()
    assert b.infer(np.zeros((2, 3, 96, 128), np.float32))["output"].shape[0] == 2


def test_export_fp32_artifact_missing_checkpoint(tmp_path):
    from build_engine.build import export_fp32_artifact
    from perception.errors import ModelError

    with pytest.raises(ModelError, match="no such checkpoint"):
        export_fp32_artifact(tmp_path / "missing.pt", tmp_path / "art")
    assert not (tmp_path / "art" / "manifest.json").exists()
