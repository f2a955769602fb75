"""The frame pipeline: reduced-scale decode maps back to SOURCE pixels; request validation
(property-based, with hypothesis): bad input raises InvalidInputError and nothing else."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perception.errors import InvalidInputError
from perception.letterbox import boxes_to_source
from perception.manifest import load_manifest
from server.pipeline import FrameInput, FramePipeline, RawPixels, RequestOptions


@pytest.fixture(scope="module")
def manifest(tiny_manifest):
    return load_manifest(tiny_manifest)


@pytest.mark.parametrize("size", [(1920, 1080), (1917, 1083), (1080, 1920)])
def test_reduced_decode_maps_back_to_source_pixels(manifest, size):
    w, h = size
    rng = np.random.default_rng(1)
    img = cv2.resize(rng.integers(0, 255, (h // 40, w // 40, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
    frame = FrameInput("front", 1, 0, encoded=cv2.imencode(".jpg", img)[1].tobytes())
    fast = FramePipeline(manifest, reduced_decode=True).prepare(frame, RequestOptions())
    full = FramePipeline(manifest, reduced_decode=False).prepare(frame, RequestOptions())
    assert (fast.image_width, fast.image_height) == (full.image_width, full.image_height) == (w, h)
    assert (fast.letterbox.src_w, fast.letterbox.src_h) == (w, h)
    # The whole placed image maps back onto the whole source image, for both paths.
    for p in (fast, full):
        lb = p.letterbox
        placed = np.array([[lb.pad_left, lb.pad_top, lb.pad_left + lb.new_w, lb.pad_top + lb.new_h]], np.float32)
        np.testing.assert_allclose(boxes_to_source(placed, lb), [[0, 0, w, h]], atol=1e-2)
    # Same picture either way (up to resampling differences).
    assert np.abs(fast.tensor.astype(float) - full.tensor.astype(float)).mean() < 0.03 * 255


def test_finish_gives_source_pixel_boxes(manifest):
    pipe = FramePipeline(manifest)
    frame = FrameInput("front", 1, 0, raw=RawPixels(640, 480, 0, 1, bytes(640 * 480 * 3)))
    p = pipe.prepare(frame, RequestOptions(score_threshold=0.01))
    out = np.zeros((3, 12), np.float32)
    out[:, 4] = 1.0
    out[:, 5] = 0.9
    # Model space is 64x48 and 640x480 fills it exactly: x10.
    out[0, :4] = [6.4, 4.8, 32.0, 24.0]
    out[1, :4] = [-10, -10, 100, 100]  # clipped to the image
    out[2, :4] = [40, 30, 50, 40]
    det = pipe.finish(out, p)
    got = sorted(map(tuple, np.round(det.boxes, 2).tolist()))
    assert got == sorted([(64.0, 48.0, 320.0, 240.0), (0.0, 0.0, 640.0, 480.0), (400.0, 300.0, 500.0, 400.0)])


pixel_formats = st.integers(min_value=0, max_value=6)
dims = st.one_of(st.integers(min_value=0, max_value=64), st.integers(min_value=0, max_value=2**32 - 1))


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=dims, h=dims, fmt=pixel_formats, stride=st.integers(min_value=0, max_value=400),
       extra=st.integers(min_value=-50, max_value=50), seed=st.integers(0, 2**16))
def test_raw_frames_valid_or_invalid_never_crash(manifest, w, h, fmt, stride, extra, seed):
    pipe = FramePipeline(manifest)
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
    assert p.tensor.shape == (48, 64, 3) and (p.image_width, p.image_height) == (w, h)


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0, max_value=1))


@settings(max_examples=300, deadline=None, database=None)
@given(score=floats, iou=floats, max_det=st.integers(min_value=-5, max_value=2**32 - 1),
       classes=st.lists(st.integers(min_value=0, max_value=20), max_size=5), agnostic=st.booleans())
def test_options_valid_or_invalid(tiny_manifest, score, iou, max_det, classes, agnostic):
    pipe = FramePipeline(load_manifest(tiny_manifest, verify_checksums=False))
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
    return pipe.manifest.postprocess.class_agnostic


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.binary(max_size=300), cut=st.integers(min_value=0, max_value=2000))
def test_encoded_garbage_and_truncation_is_invalid(tiny_manifest, data, cut):
    pipe = FramePipeline(load_manifest(tiny_manifest, verify_checksums=False))
    good = cv2.imencode(".jpg", np.full((40, 60, 3), 128, np.uint8))[1].tobytes()
    for payload in (data, b"\xff\xd8" + data, good[: min(cut, len(good) - 1)]):
        try:
            p = pipe.prepare(FrameInput("cam", 0, 0, encoded=payload), RequestOptions())
        except InvalidInputError:
            continue
        assert p.tensor.shape == (48, 64, 3)
