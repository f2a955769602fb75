"""The frame pipeline's post-processing of a reduced-scale decode: boxes wholly past the true
image edge are no detections, and take none of the max_detections places."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from perception.manifest import load_manifest
from perception.pipeline import FrameInput, FramePipeline, Prepared, RequestOptions
from perception.postprocess import MAX_DETECTIONS_LIMIT


@pytest.fixture(scope="module")
def pipe_and_frame(tiny_manifest):
    """A pipeline whose 224x126 input makes a 1913x1081 JPEG decode at 1/8 scale, and the
    prepared frame: the 1/8 image is 240x136 and spans 1920x1088 source pixels, 7 px past the
    true right and bottom edges."""
    manifest = load_manifest(tiny_manifest)
    spec = dataclasses.replace(manifest.preprocess, input_width=224, input_height=126)
    pipe = FramePipeline.from_manifest(dataclasses.replace(manifest, preprocess=spec), reduced_decode=True)
    rng = np.random.default_rng(3)
    img = cv2.resize(rng.integers(0, 255, (27, 48, 3), dtype=np.uint8), (1913, 1081))
    frame = FrameInput("front", 1, 0, encoded=cv2.imencode(".jpg", img)[1].tobytes())
    return pipe, frame


def _prepare(pipe_and_frame, max_detections: int) -> tuple[FramePipeline, Prepared]:
    pipe, frame = pipe_and_frame
    p = pipe.prepare(frame, RequestOptions(score_threshold=0.01, max_detections=max_detections))
    lb = p.letterbox
    # The premise: the placement spans more than the true image.
    assert (p.image_width, p.image_height) == (1913, 1081)
    assert (lb.src_w, lb.src_h) == (1920, 1088)
    return pipe, p


def _outputs(boxes: list[list[float]], scores: list[float], num_classes: int) -> dict[str, np.ndarray]:
    out = np.zeros((len(boxes), 5 + num_classes), np.float32)
    out[:, :4] = boxes
    out[:, 4] = 1.0
    out[:, 5] = scores
    return {"output": out}


def _model_x(p: Prepared, source_x: float) -> float:
    lb = p.letterbox
    return lb.pad_left + source_x * lb.scale_x


def test_boxes_past_the_true_edge_take_no_max_detections_place(pipe_and_frame):
    pipe, p = _prepare(pipe_and_frame, max_detections=2)
    # Two slivers between the true right edge (1913) and the decoded span's (1920), scored
    # highest; two real boxes scored lower.
    x1, x2 = _model_x(p, 1914.5), _model_x(p, 1919.5)
    boxes: list[list[float]] = [[x1, 10, x2, 20], [x1, 40, x2, 50], [10, 10, 50, 50], [100, 60, 140, 100]]
    det = pipe.finish(_outputs(boxes, [0.95, 0.9, 0.8, 0.7], pipe.num_classes), p)
    assert len(det) == 2
    np.testing.assert_allclose(det.scores, [0.8, 0.7], rtol=1e-6)
    assert (det.boxes[:, [0, 2]] <= 1913).all() and (det.boxes[:, [1, 3]] <= 1081).all()


def test_answer_is_the_best_valid_boxes_in_order(pipe_and_frame):
    """Whatever the cut, the answer is the first max_detections of the uncut answer: the same
    boxes, scores and order; boxes crossing the true edge are clipped to it, not dropped."""
    rng = np.random.default_rng(7)
    pipe, p_all = _prepare(pipe_and_frame, max_detections=MAX_DETECTIONS_LIMIT)
    lb = p_all.letterbox
    n = 60
    # Small boxes anywhere in the placed image, many of them at or past the true edges.
    x1 = rng.uniform(lb.pad_left, _model_x(p_all, 1920) - 0.2, n)
    y1 = rng.uniform(lb.pad_top, lb.pad_top + lb.new_h - 0.2, n)
    y1[: n // 3] = rng.uniform(lb.pad_top + 1081 * lb.scale_y, lb.pad_top + lb.new_h - 0.2, n // 3)
    boxes = np.stack([x1, y1, x1 + rng.uniform(0.1, 1.5, n), y1 + rng.uniform(0.1, 1.5, n)], axis=1)
    scores = rng.uniform(0.05, 1.0, n)
    outputs = _outputs(boxes.tolist(), scores.tolist(), pipe.num_classes)
    full = pipe.finish(outputs, p_all)
    assert 0 < len(full) < n  # some boxes were wholly past the edge, and some were kept
    assert (full.boxes[:, [0, 2]] <= 1913).all() and (full.boxes[:, [1, 3]] <= 1081).all()
    assert ((full.boxes[:, 2] > full.boxes[:, 0]) & (full.boxes[:, 3] > full.boxes[:, 1])).all()
    for k in (1, 5, len(full) - 1, len(full), len(full) + 3):
        _, p = _prepare(pipe_and_frame, max_detections=k)
        det = pipe.finish(outputs, p)
        assert len(det) == min(k, len(full))
        np.testing.assert_array_equal(det.boxes, full.boxes[:k])
        np.testing.assert_array_equal(det.scores, full.scores[:k])
        np.testing.assert_array_equal(det.class_ids, full.class_ids[:k])


def test_priors_are_the_bytes_the_manifest_hashed(tmp_path) -> None:
    """The manifest's check hashed the priors file when it loaded; the pipeline read the path
    again, after the engine's load (minutes for a TensorRT build), and used whatever it held."""
    from perception.errors import ManifestError
    from perception.manifest import Priors, sha256_file
    from tests.tiny_model import make_tiny_artifact

    d = tmp_path / "ssd"
    m = load_manifest(make_tiny_artifact(d))
    np.save(d / "priors.npy", np.tile(np.array([[0.5, 0.5, 0.2, 0.2]], np.float32), (6, 1)))
    priors = Priors("priors.npy", sha256_file(d / "priors.npy"))
    post = dataclasses.replace(m.postprocess, output_layout="ssd", priors=priors)
    m = dataclasses.replace(m, postprocess=post)
    loaded = FramePipeline.from_manifest(m).context.priors
    assert loaded is not None and loaded[0].tolist() == pytest.approx([0.5, 0.5, 0.2, 0.2])
    np.save(d / "priors.npy", np.tile(np.array([[0.1, 0.1, 0.9, 0.9]], np.float32), (6, 1)))  # replaced since
    with pytest.raises(ManifestError, match="does not match its sha256"):
        FramePipeline.from_manifest(m)


def _bound(layout: str, outputs: dict[str, np.ndarray]) -> FramePipeline:
    from perception.layouts import TensorInfo
    from perception.manifest.schema import PostprocessSpec, PreprocessSpec

    pipe = FramePipeline(PreprocessSpec(64, 64), PostprocessSpec(output_layout=layout), ("car", "truck"))
    pipe.bind_outputs([TensorInfo(n, (None, *a.shape[1:]), str(a.dtype)) for n, a in outputs.items()])
    return pipe


def _yolov8(frames: int = 2) -> np.ndarray:
    return np.random.default_rng(0).random((frames, 4 + 2, 50)).astype(np.float32)


def _yolov5(frames: int = 2) -> np.ndarray:
    return np.random.default_rng(0).random((frames, 50, 5 + 2)).astype(np.float32)


def _nan_scores(a: np.ndarray) -> np.ndarray:
    a[:, 4:] = np.nan
    return a


def _nan_objectness(a: np.ndarray) -> np.ndarray:
    a[:, :, 4] = np.nan
    return a


def _nan_second_frame(a: np.ndarray) -> np.ndarray:
    a[1] = np.nan
    return a


@pytest.mark.parametrize("layout, name, outputs, part", [
    # The check judged whole outputs by their first value: finite boxes ahead of all-NaN scores
    # or objectness in the same tensor, or a batch whose first frame was fine, passed.
    ("yolov8", "output0", _nan_scores(_yolov8()), "scores"),
    ("yolov5", "output0", _nan_objectness(_yolov5()), "objectness"),
    ("yolo_obj", "predictions", _nan_objectness(_yolov5()), "objectness"),
    ("yolov8", "output0", _nan_second_frame(_yolov8()), "boxes"),
])
def test_a_part_or_a_frame_that_is_all_nan_is_refused(layout, name, outputs, part) -> None:
    from perception.errors import ModelError

    pipe = _bound(layout, {name: outputs})
    with pytest.raises(ModelError, match=f"the model's {part} \\(output '{name}'\\) are all NaN or infinite"):
        pipe.check_finite({name: outputs})
    pipe.check_finite({name: _yolov8() if layout == "yolov8" else _yolov5()})  # a sound model passes


def test_a_post_nms_count_that_is_nan_is_a_model_error_not_a_crash() -> None:
    """TF-style detectors give num_detections as float: NaN made int() raise ValueError."""
    from perception.errors import ModelError

    nan = np.full((2, 5), np.nan, np.float32)
    outputs = {"num_detections": np.full((2, 1), np.nan, np.float32), "detection_boxes": np.full((2, 5, 4), np.nan,
               np.float32), "detection_scores": nan, "detection_classes": nan.copy()}
    pipe = _bound("nms_detections", outputs)
    with pytest.raises(ModelError, match="detection count .* is nan"):
        pipe.check_finite(outputs)
    padded = dict(outputs, num_detections=np.zeros((2, 1), np.float32))  # NaN padding past a count of 0 is fine
    pipe.check_finite(padded)
