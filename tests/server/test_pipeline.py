"""The frame pipeline: reduced-scale decode maps back to SOURCE pixels; request validation
(property-based, with hypothesis): bad input raises InvalidInputError and nothing else."""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perception.errors import InvalidInputError
from perception.manifest import load_manifest
from perception.pipeline import FrameInput, FramePipeline, RawPixels, RequestOptions


@pytest.fixture(scope="module")
def manifest(tiny_manifest):
    return load_manifest(tiny_manifest)


@pytest.mark.parametrize("size", [(1920, 1080), (1917, 1083), (1080, 1920)])
def test_reduced_decode_matches_full_decode(manifest, size):
    w, h = size
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 255, (h // 40, w // 40, 3), dtype=np.uint8)
    img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
    frame = FrameInput("front", 1, 0, encoded=cv2.imencode(".jpg", img)[1].tobytes())
    fast = FramePipeline.from_manifest(manifest, reduced_decode=True).prepare(frame, RequestOptions())
    full = FramePipeline.from_manifest(manifest, reduced_decode=False).prepare(frame, RequestOptions())
    assert (fast.image_width, fast.image_height) == (full.image_width, full.image_height) == (w, h)
    # Same picture either way (up to resampling differences).
    assert fast.tensor is not None and full.tensor is not None
    assert np.abs(fast.tensor.astype(float) - full.tensor.astype(float)).mean() < 0.03 * 255


def _edges(coverage: np.ndarray, inside: int, lo: int, hi: int) -> tuple[float, float]:
    """Sub-pixel (start, end) of the run of 1s around index ``inside`` of a 0..1 profile whose
    background is 0 on [lo, hi) (the placed image, not the letterbox padding)."""
    return inside - coverage[lo:inside].sum(), inside + coverage[inside:hi].sum()


@pytest.mark.parametrize("reduced", [True, False])
def test_known_object_maps_back_to_its_source_pixels(manifest, reduced):
    # 1913x1081 is 8k+1 on both sides: a 1/8 decode is 240x136 and spans 1920x1088 source
    # pixels, the worst case for referring the placement to the source size (7 px).
    w, h = 1913, 1081
    truth = np.array([1600, 800, 1880, 1060], np.float64)
    src = np.zeros((h, w), np.uint8)
    src[800:1060, 1600:1880] = 255
    data = cv2.imencode(".jpg", cv2.cvtColor(src, cv2.COLOR_GRAY2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    # A 224x126 input makes the pipeline take the 1/8 decode (1913 // 8 = 239 >= 224).
    spec = dataclasses.replace(manifest.preprocess, input_width=224, input_height=126)
    pipe = FramePipeline.from_manifest(dataclasses.replace(manifest, preprocess=spec), reduced_decode=reduced)
    p = pipe.prepare(FrameInput("front", 1, 0, encoded=data), RequestOptions(score_threshold=0.01))
    lb = p.letterbox
    # Where the object really is in model space, measured from the letterboxed pixels.
    assert p.tensor is not None
    canvas = p.tensor[..., 0].astype(np.float64) / 255.0
    cx, cy = int(lb.pad_left + 1740 * lb.new_w / w), int(lb.pad_top + 930 * lb.new_h / h)
    x1, x2 = _edges(canvas[cy - 3 : cy + 4].mean(axis=0), cx, lb.pad_left, lb.pad_left + lb.new_w)
    y1, y2 = _edges(canvas[:, cx - 3 : cx + 4].mean(axis=1), cy, lb.pad_top, lb.pad_top + lb.new_h)
    out = np.zeros((1, 5 + manifest.num_classes), np.float32)
    out[0, :6] = [x1, y1, x2, y2, 1.0, 0.9]
    det = pipe.finish({"output": out}, p)
    assert len(det) == 1
    # One source pixel is 1/8.6 model pixel: ~1 px needs the exact placement, not algebra.
    np.testing.assert_allclose(det.boxes[0], truth, atol=1.5)


def test_finish_gives_source_pixel_boxes(manifest):
    pipe = FramePipeline.from_manifest(manifest)
    frame = FrameInput("front", 1, 0, raw=RawPixels(640, 480, 0, 1, bytes(640 * 480 * 3)))
    p = pipe.prepare(frame, RequestOptions(score_threshold=0.01))
    out = np.zeros((3, 12), np.float32)
    out[:, 4] = 1.0
    out[:, 5] = 0.9
    # Model space is 64x48 and 640x480 fills it exactly: x10.
    out[0, :4] = [6.4, 4.8, 32.0, 24.0]
    out[1, :4] = [-10, -10, 100, 100]  # clipped to the image
    out[2, :4] = [40, 30, 50, 40]
    det = pipe.finish({"output": out}, p)
    got = sorted(map(tuple, np.round(det.boxes, 2).tolist()))
    assert got == sorted([(64.0, 48.0, 320.0, 240.0), (0.0, 0.0, 640.0, 480.0), (400.0, 300.0, 500.0, 400.0)])


pixel_formats = st.integers(min_value=0, max_value=6)
dims = st.one_of(st.integers(min_value=0, max_value=64), st.integers(min_value=0, max_value=2**32 - 1))


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=dims, h=dims, fmt=pixel_formats, stride=st.integers(min_value=0, max_value=400),
       extra=st.integers(min_value=-50, max_value=50), seed=st.integers(0, 2**16))
def test_raw_frames_valid_or_invalid_never_crash(manifest, w, h, fmt, stride, extra, seed):
    pipe = FramePipeline.from_manifest(manifest)
    bpp = {1: 3, 2: 3, 3: 1, 4: 1}.get(fmt, 3)
    rows = h + h // 2 if fmt == 4 else h
    n = max(0, min((stride or w * bpp) * rows + extra, 1 << 20))  # never build huge buffers here
    data = np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8).tobytes()
    frame = FrameInput("cam", 0, 0, raw=RawPixels(w, h, stride, fmt, data))
    try:
        p = pipe.prepare(frame, RequestOptions())
    except InvalidInputError as exc:
        assert str(exc)
        return
    # Accepted only if it was a well-formed frame.
    assert 1 <= fmt <= 4 and w > 0 and h > 0
    row = w * bpp
    s = stride or row
    assert s >= row and s * (rows - 1) + row <= n <= s * rows
    assert p.tensor is not None and p.tensor.shape == (48, 64, 3) and (p.image_width, p.image_height) == (w, h)


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0, max_value=1))


@settings(max_examples=300, deadline=None, database=None)
@given(score=floats, iou=floats, max_det=st.integers(min_value=-5, max_value=2**32 - 1),
       classes=st.lists(st.integers(min_value=0, max_value=20), max_size=5), agnostic=st.booleans())
def test_options_valid_or_invalid(tiny_manifest, score, iou, max_det, classes, agnostic):
    pipe = FramePipeline.from_manifest(load_manifest(tiny_manifest, verify_checksums=False))
    req = RequestOptions(score, iou, max_det, tuple(classes), agnostic)
    try:
        o = pipe.options(req)
    except InvalidInputError as exc:
        assert str(exc)
        bad = (not math.isfinite(score) or not 0 <= score <= 1 or not math.isfinite(iou) or not 0 <= iou <= 1
               or max_det < 0 or max_det > 10_000 or any(c >= 7 for c in classes))
        assert bad, f"valid options refused: {req}: {exc}"
        return
    assert 0 <= o.score_threshold <= 1 and 0 < o.iou_threshold <= 1 and 1 <= o.max_detections <= 10_000
    assert set(o.class_filter) == set(classes) and o.class_agnostic == (agnostic or manifest_agnostic(pipe))


def manifest_agnostic(pipe: FramePipeline) -> bool:
    return pipe.postprocess.class_agnostic


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.binary(max_size=300), cut=st.integers(min_value=0, max_value=2000))
def test_encoded_garbage_and_truncation_is_invalid(tiny_manifest, data, cut):
    pipe = FramePipeline.from_manifest(load_manifest(tiny_manifest, verify_checksums=False))
    good = cv2.imencode(".jpg", np.full((40, 60, 3), 128, np.uint8))[1].tobytes()
    for payload in (data, b"\xff\xd8" + data, good[: min(cut, len(good) - 1)]):
        try:
            p = pipe.prepare(FrameInput("cam", 0, 0, encoded=payload), RequestOptions())
        except InvalidInputError:
            continue
        assert p.tensor is not None and p.tensor.shape == (48, 64, 3)
