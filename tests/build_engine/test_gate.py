"""The gate: parity maths, gate decisions, and evaluation through the server's runtime code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from build_engine.gate import gate_decision, parity
from perception.types import Detections


def _dets(boxes, scores=None, classes=None) -> Detections:
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(b)
    s = np.asarray(scores if scores is not None else np.linspace(0.9, 0.5, n), np.float32)
    c = np.asarray(classes if classes is not None else np.zeros(n), np.int64)
    return Detections(b, s, c)


def test_parity_identical_is_stable():
    a = [_dets([[0, 0, 10, 10], [20, 20, 40, 40]]), _dets([])]
    p = parity(a, a)
    assert p["stable"] == 1.0 and p["vanished"] == p["moved"] == p["appeared"] == 0.0


def test_parity_moved_vanished_appeared_by_hand():
    ref = [_dets([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], classes=[0, 0, 1])]
    other = [_dets([[0, 0, 10, 11],      # IoU 0.909: stable
                    [22, 20, 42, 40],    # IoU 0.818: moved
                    [50, 50, 60, 60],    # same box, other class: no match -> ref vanished, this appeared
                    [80, 80, 90, 90]],   # appeared
                   classes=[0, 0, 0, 0])]
    p = parity(ref, other)
    assert p["stable"] == pytest.approx(1 / 3)
    assert p["moved"] == pytest.approx(1 / 3)
    assert p["vanished"] == pytest.approx(1 / 3)
    assert p["appeared"] == pytest.approx(2 / 4)


def test_parity_needs_same_images():
    with pytest.raises(ValueError):
        parity([_dets([])], [])


def test_gate_decision():
    ok = gate_decision(0.500, 0.495, 1.0)
    assert ok["passed"] and ok["map50_95_drop_points"] == pytest.approx(0.5)
    bad = gate_decision(0.500, 0.480, 1.0)
    assert not bad["passed"] and "outside" in bad["reason"]
    assert gate_decision(0.5, 0.51, 0.0)["passed"]  # an improvement always passes


def make_pseudo_labelled_set(manifest_path: Path, root: Path, n: int = 8, seed: int = 2) -> Path:
    """A val set whose ground truth is the FP32 model's own detections on rendered scenes, so
    an untrained model still has a meaningful mAP (FP32 ~ 1.0) and any variant drift shows."""
    from build_engine.calibration import read_bgr
    from build_engine.data.generate import generate_dataset
    from build_engine.gate import make_backend
    from perception.manifest import load_manifest
    from perception.postprocess import PostprocessOptions, postprocess
    from perception.preprocess import preprocess

    m = load_manifest(manifest_path)
    generate_dataset(root, n, seed=seed, width=320, height=180)
    coco = json.loads((root / "annotations.json").read_text())
    backend = make_backend(m.path_of(m.variant("fp32")), 1)
    opts = PostprocessOptions.from_spec(m.postprocess)
    anns = []
    for im in coco["images"]:
        x, lb = preprocess(read_bgr(root / "images" / im["file_name"]), m.preprocess)
        d = postprocess(backend.infer(x[None])[0], lb, opts)
        for b, c in zip(d.boxes, d.class_ids):
            if min(b[2] - b[0], b[3] - b[1]) < 2:  # the untrained head's boxes clipped flat at the border
                continue
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": int(c) + 1, "iscrowd": 0,
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                         "area": float((b[2] - b[0]) * (b[3] - b[1]))})
    coco["annotations"] = anns
    (root / "annotations.json").write_text(json.dumps(coco))
    assert len(anns) > n  # the untrained model must detect something for the test to mean anything
    return root


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from tests.build_engine.test_quantize import _tiny_detector  # noqa: F401  (same tiny model)
    from build_engine.build import export_fp32_artifact
    from build_engine.checkpoint import meta_for, save_checkpoint

    tmp = tmp_path_factory.mktemp("gate")
    model = _tiny_detector()
    ckpt = save_checkpoint(tmp / "detector.pt", model, meta_for(model))
    manifest = export_fp32_artifact(ckpt, tmp / "art")
    return manifest, make_pseudo_labelled_set(manifest, tmp / "val")


def test_evaluate_variant_through_serving_code(artifact):
    from build_engine.gate import ValSet, evaluate_variant, measure_latency
    from perception.manifest import load_manifest

    manifest_path, val = artifact
    m = load_manifest(manifest_path)
    vs = ValSet.load(val)
    ev = evaluate_variant("fp32", m.path_of(m.variant()), vs, m.preprocess, m.postprocess, threads=1)
    # Ground truth = its own detections: near-perfect scores through the full serving path.
    # (Not exactly 1: detections clipped flat at the image border have no ground truth.)
    assert ev.metrics["map50"] > 0.85 and ev.metrics["precision"] > 0.9 and ev.metrics["recall"] > 0.95
    assert len(ev.detections) == len(vs.images)
    assert parity(ev.detections, ev.detections)["stable"] == 1.0
    lat = measure_latency({"a": m.path_of(m.variant()), "b": m.path_of(m.variant())},
                          np.zeros((1, 3, 96, 128), np.float32), runs=5, threads=1)
    assert set(lat) == {"a", "b"} and all(v["p95"] >= v["p50"] > 0 for v in lat.values())


def test_valset_missing_image(artifact, tmp_path):
    import shutil

    from build_engine.gate import ValSet
    from perception.errors import DataError

    _, val = artifact
    copy = Path(shutil.copytree(val, tmp_path / "v"))
    first = sorted((copy / "images").iterdir())[0]
    first.unlink()
    with pytest.raises(DataError, match="missing"):
        ValSet.load(copy)
    assert len(ValSet.load(val, limit=3).images) == 3
