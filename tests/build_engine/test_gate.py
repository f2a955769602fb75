"""The gate: parity maths, gate decisions, and evaluation through the server's runtime code."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from build_engine.gate import gate_decision, parity
from build_engine.thresholds import GateLimits, GateThresholds
from perception.errors import ConfigError
from perception.layouts import TensorInfo
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


def _lat(min_ms: float, p95_ms: float | None = None) -> dict[str, float]:
    return {"min": min_ms, "p50": min_ms * 1.1, "p95": p95_ms if p95_ms is not None else min_ms * 1.2}


def test_gate_decision_map_drop():
    limits = GateLimits(max_drop_points=1.0, max_latency_ratio=1.0)
    ok = gate_decision(limits, 0.500, 0.495, _lat(2.0), _lat(1.5))
    assert ok["passed"] and ok["map50_95_drop_points"] == pytest.approx(0.5)
    bad = gate_decision(limits, 0.500, 0.480, _lat(2.0), _lat(1.5))
    assert not bad["passed"] and "mAP50-95 drop +2.00 points vs fp32, outside" in bad["reason"]
    assert gate_decision(GateLimits(0.0, 1.0), 0.5, 0.51, _lat(2.0), _lat(2.0))["passed"]  # an improvement passes


def test_gate_decision_latency_ratio_fails_an_accurate_but_slow_variant():
    limits = GateLimits(max_drop_points=1.0, max_latency_ratio=1.0)
    slow = gate_decision(limits, 0.5, 0.5, _lat(2.0), _lat(2.5))
    assert not slow["passed"]
    assert slow["latency_ratio"] == pytest.approx(1.25) and slow["max_latency_ratio"] == 1.0
    # The verdict states both checks, each against its own limit.
    assert "mAP50-95 drop +0.00 points vs fp32, within the 1.00-point gate" in slow["reason"]
    assert "1.25x fp32's 2.00 ms, outside the 1.00x gate" in slow["reason"]
    # FP16 on a CPU is allowed to be somewhat slower (kept for GPU devices).
    assert gate_decision(GateThresholds().limits("base", "fp16"), 0.5, 0.5, _lat(2.0), _lat(2.5))["passed"]
    assert not gate_decision(GateThresholds().limits("base", "fp16"), 0.5, 0.5, _lat(2.0), _lat(3.1))["passed"]


def test_gate_decision_latency_budget_applies_to_the_reference_too():
    ref = gate_decision(GateLimits(None, None), 0.5, 0.5, _lat(2.0), _lat(2.0))
    assert ref == {"passed": True, "reason": "reference (FP32)"}
    over = gate_decision(GateLimits(None, None, latency_budget_ms=3.0), 0.5, 0.5, _lat(2.0), _lat(2.0, p95_ms=3.5))
    assert not over["passed"] and over["reason"].startswith("reference (FP32); p95 latency 3.50 ms, outside")
    within = gate_decision(GateLimits(1.0, 1.5, latency_budget_ms=3.0), 0.5, 0.5, _lat(2.0), _lat(2.0, p95_ms=2.9))
    assert within["passed"] and within["reason"].count("within") == 3


def test_thresholds_per_variant():
    t = GateThresholds()
    assert t.limits("base", "fp32") == GateLimits(None, None, None)
    assert t.limits("base", "fp16") == GateLimits(0.2, 1.5)
    assert t.limits("base", "int8") == GateLimits(1.0, 1.0)
    assert t.limits("pruned", "fp32") == t.limits("pruned2", "fp32") == GateLimits(1.5, 1.0)
    t = GateThresholds(int8_max_latency_ratio=0.8, pruned_max_latency_ratio=0.5, latency_budget_ms=9.0)
    assert t.limits("pruned", "int8") == GateLimits(2.5, 0.4, 9.0)  # the two steps compound
    assert t.limits("pruned", "fp16") == GateLimits(1.7, 0.5 * 1.5, 9.0)
    assert t.limits("base", "fp32").latency_budget_ms == 9.0
    with pytest.raises(ValueError):
        t.limits("base", "int4")
    for bad in ({"int8_max_latency_ratio": 0.0}, {"fp16_max_latency_ratio": -1.0}, {"latency_budget_ms": 0.0},
                {"int8": -0.1}, {"int8": math.nan}, {"fp16": math.inf}):  # NaN failed the build after export
        with pytest.raises(ConfigError):
            GateThresholds(**bad)


def make_pseudo_labelled_set(manifest_path: Path, root: Path, n: int = 8, seed: int = 2) -> Path:
    """A val set whose ground truth is the FP32 model's own detections on rendered scenes, so
    an untrained model still has a meaningful mAP (FP32 ~ 1.0) and any variant drift shows."""
    from build_engine.data.generate import generate_dataset
    from build_engine.gate import make_backend
    from perception.manifest import load_manifest
    from perception.pipeline import FramePipeline, RequestOptions

    m = load_manifest(manifest_path)
    generate_dataset(root, n, seed=seed, width=320, height=180)
    coco = json.loads((root / "annotations.json").read_text())
    backend = make_backend(m.path_of(m.variant("fp32")), 1)
    pipeline = FramePipeline.from_manifest(m)
    dets = pipeline.detect_files([root / "images" / im["file_name"] for im in coco["images"]], backend.infer,
                                 RequestOptions())
    anns: list[dict[str, Any]] = []
    for im, d in zip(coco["images"], dets, strict=True):
        for b, c in zip(d.boxes, d.class_ids, strict=True):
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
    from build_engine.build import export_fp32_artifact
    from build_engine.checkpoint import meta_for, save_checkpoint
    from tests.build_engine.test_quantize import _tiny_detector  # noqa: F401  (same tiny model)

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


class _SlowBackend:
    """A real backend that takes ``extra_s`` longer per call: an accurate but slow variant."""

    def __init__(self, inner, extra_s: float) -> None:
        self.inner, self.extra_s = inner, extra_s

    @property
    def outputs(self):
        return self.inner.outputs

    def infer(self, batch):
        import time

        time.sleep(self.extra_s)
        return self.inner.infer(batch)

    def deactivate(self) -> None:
        self.inner.deactivate()


def test_run_gate_fails_a_variant_slower_than_fp32(artifact):
    from build_engine.gate import ValSet, make_backend, run_gate
    from perception.manifest import load_manifest

    manifest_path, val = artifact
    m = load_manifest(manifest_path)
    model = m.path_of(m.variant("fp32"))
    # The same model twice, one of them 20 ms slower per call (the tiny model runs in ~1 ms):
    # identical mAP, so only the latency check can fail it.
    slow_s = 0.02

    def factory(name, path):
        b = make_backend(path, 1)
        return _SlowBackend(b, slow_s) if name == "int8" else b

    t = GateThresholds()
    res = run_gate({"fp32": model, "int8": model}, {n: t.limits("base", n) for n in ("fp32", "int8")},
                   ValSet.load(val, limit=4), m.preprocess, m.postprocess, runs=3, threads=1, factory=factory)
    assert res["fp32"].gate == {"passed": True, "reason": "reference (FP32)"}
    gate = res["int8"].gate
    assert not gate["passed"] and gate["map50_95_drop_points"] == 0.0
    assert gate["latency_ratio"] > 2 and "outside the 1.00x gate" in gate["reason"]
    assert res["int8"].latency_ms["min"] >= 1e3 * slow_s


# A val image at least twice the model input on both sides: the server decodes such a JPEG at
# reduced scale (libjpeg 1/2, 1/4, 1/8), so its pixels differ from a full decode + resize.
_LARGE = ((512, 384), (515, 389), (250, 180))  # 1/4, 1/4 (not a multiple of 4), full


def _jpeg_val_set(root: Path, classes: int = 3, sizes: tuple[tuple[int, int], ...] = _LARGE) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i, (w, h) in enumerate(sizes, start=1):
        # Smooth gradients plus fine noise: a scaled decode and an area resize round differently.
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], axis=2).astype(np.int16)
        img = np.clip(img + rng.integers(-40, 40, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"{i:03d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        images.append({"id": i, "file_name": f"{i:03d}.jpg", "width": w, "height": h})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [10.0, 10.0, w / 2, h / 2],
                     "area": w * h / 4, "iscrowd": 0})
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(classes)]
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def _imread(path: Path) -> NDArray[np.uint8]:
    """A full-size BGR decode of ``path``: what the reduced-scale decode must not match."""
    img = cv2.imread(str(path))
    assert img is not None, f"{path} does not decode"
    return np.asarray(img, dtype=np.uint8)


class _RecordingBackend:
    """Records every input; answers two confident boxes in model-input pixels per image."""

    name = "recording"

    def __init__(self, classes: int = 3) -> None:
        self.inputs: list[np.ndarray] = []
        self.classes = classes

    @property
    def max_batch(self) -> int:
        return 64

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return (TensorInfo("output", (None, 4, 5 + self.classes)),)

    def activate(self) -> None:
        pass

    def infer(self, batch: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
        self.inputs.append(batch.copy())
        out = np.zeros((len(batch), 4, 5 + self.classes), np.float32)
        out[:, 0, :6] = [0, 0, 128, 96, 0.9, 0.9]  # the whole canvas
        out[:, 1, :6] = [20, 30, 60, 70, 0.8, 0.9]
        return {"output": out}

    def deactivate(self) -> None:
        pass


def test_gate_sees_exactly_the_pixels_served(tmp_path):
    """The gate feeds each val image's encoded bytes through the one FramePipeline: the model
    gets the same input tensor the server would build (reduced-scale JPEG decode included) and
    detections come back in source pixels the same way."""
    from build_engine.gate import ValSet, evaluate_variant
    from perception.manifest import PostprocessSpec, PreprocessSpec
    from perception.pipeline import EVAL_REQUEST, FrameInput, FramePipeline, frame_outputs
    from perception.preprocess import preprocess_batch

    pre, post = PreprocessSpec(input_width=128, input_height=96), PostprocessSpec()
    vs = ValSet.load(_jpeg_val_set(tmp_path / "val"))
    backend = _RecordingBackend()
    ev = evaluate_variant("v", tmp_path / "unused.onnx", vs, pre, post, batch_size=2, backend=backend)

    # What the server builds (its scheduler batches the canvases of ``prepare``).
    pipeline = FramePipeline(pre, post, ("c0", "c1", "c2"))
    prepared = [pipeline.prepare(FrameInput("cam", i, 0, encoded=p.read_bytes()), EVAL_REQUEST) for i, p in vs.images]
    served = pipeline.to_batch([p.tensor for p in prepared])
    assert [len(b) for b in backend.inputs] == [2, 1]
    np.testing.assert_array_equal(np.concatenate(backend.inputs), served)
    # The check has teeth: a full decode + resize of the large images gives other pixels.
    full, _ = preprocess_batch([_imread(p) for _, p in vs.images], pre)
    assert not np.array_equal(full[:2], served[:2]) and np.array_equal(full[2], served[2])

    raw = backend.infer(served)
    for i, (det, prep, (w, h)) in enumerate(zip(ev.detections, prepared, _LARGE, strict=True)):
        expect = pipeline.finish(frame_outputs(raw, i), prep)
        np.testing.assert_array_equal(det.boxes, expect.boxes)
        # The whole-canvas box is the whole source image, in source pixels.
        np.testing.assert_allclose(det.boxes[0], [0, 0, w, h], atol=4.0)
    assert {p["image_id"] for p in ev.predictions} == {1, 2, 3}


def test_calibration_gate_and_serving_see_identical_inputs_for_a_1080p_jpeg(tmp_path):
    """One 1920x1080 JPEG: INT8 calibration, the build gate and the served path (and so
    verify-engine, which batches through the same pipeline) hand the model byte-identical
    input tensors, all through the reduced-scale decode a full-size decode would not give."""
    from build_engine.calibration import ImageCalibrationReader
    from build_engine.gate import ValSet, evaluate_variant
    from perception.manifest import PostprocessSpec, PreprocessSpec
    from perception.pipeline import FrameInput, FramePipeline, RequestOptions
    from perception.preprocess import preprocess_batch

    root = _jpeg_val_set(tmp_path / "val", sizes=((1920, 1080),))
    path = root / "images" / "001.jpg"
    pre, post = PreprocessSpec(input_width=512, input_height=288), PostprocessSpec()
    calibration_batch = ImageCalibrationReader([path], pre).get_next()
    assert calibration_batch is not None
    calibrated = calibration_batch["images"]
    backend = _RecordingBackend()
    evaluate_variant("v", tmp_path / "unused.onnx", ValSet.load(root), pre, post, backend=backend)
    pipeline = FramePipeline(pre, post, ("c0", "c1", "c2"))
    served = pipeline.to_batch([pipeline.prepare(FrameInput("front", 0, 0, encoded=path.read_bytes()),
                                                 RequestOptions()).tensor])
    assert calibrated.tobytes() == backend.inputs[0].tobytes() == served.tobytes()
    full, _ = preprocess_batch([_imread(path)], pre)
    assert full.tobytes() != served.tobytes()  # a full decode differs: the check can fail


def test_gate_refuses_a_val_image_the_server_would_refuse(tmp_path):
    import cv2

    from build_engine.gate import ValSet, evaluate_variant
    from perception.errors import DataError
    from perception.manifest import PostprocessSpec, PreprocessSpec

    root = _jpeg_val_set(tmp_path / "val")
    bmp = root / "images" / "002.jpg"
    cv2.imwrite(str(tmp_path / "x.bmp"), np.zeros((96, 128, 3), np.uint8))
    bmp.write_bytes((tmp_path / "x.bmp").read_bytes())  # a BMP under a .jpg name: the server says no
    with pytest.raises(DataError, match="002.jpg.*would refuse"):
        evaluate_variant("v", tmp_path / "unused.onnx", ValSet.load(root),
                         PreprocessSpec(input_width=128, input_height=96), PostprocessSpec(),
                         backend=_RecordingBackend())


@pytest.mark.parametrize("crowd", [(1, 1), (1, 0)])
def test_check_valset_refuses_a_set_with_only_crowd_regions(tmp_path: Path, crowd: tuple[int, int]) -> None:
    """COCO scores no crowd region as an object to find: a val set of crowd boxes only scored
    "no data" for every variant, and the accuracy gate passed them all."""
    from build_engine.gate import ValSet, check_valset
    from perception.errors import DataError

    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.jpg"), np.zeros((32, 32, 3), np.uint8))
    anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": c}
            for k, c in enumerate(crowd)]
    (tmp_path / "annotations.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 32, "height": 32}],
        "annotations": anns, "categories": [{"id": 1, "name": "car"}]}))
    vs = ValSet.load(tmp_path)
    if all(crowd):
        with pytest.raises(DataError, match="crowd region"):
            check_valset(vs, ["car"], tmp_path)
    else:
        check_valset(vs, ["car"], tmp_path)  # one object to find is enough
