"""The one pre-processing: letterbox, colour order, scale / mean / std, batching."""

from __future__ import annotations

import numpy as np

from perception.manifest import PreprocessSpec
from perception.preprocess import preprocess, preprocess_batch


def test_letterbox_colour_and_scale():
    spec = PreprocessSpec(input_width=64, input_height=48)
    img = np.zeros((20, 80, 3), np.uint8)
    img[:, :, 0] = 255  # blue in BGR
    x, lb = preprocess(img, spec)
    assert x.shape == (3, 48, 64) and x.dtype == np.float32
    assert (lb.new_w, lb.new_h, lb.pad_left, lb.pad_top) == (64, 16, 0, 16)
    assert np.allclose(x[2, 24, 10], 1.0) and np.allclose(x[0, 24, 10], 0.0)  # RGB order: blue is channel 2
    assert np.allclose(x[:, 0, 0], 114 / 255)  # padding


def test_mean_std_and_batch():
    spec = PreprocessSpec(input_width=32, input_height=32, color_order="BGR", scale=1.0,
                          mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0), letterbox=False)
    img = np.full((16, 16, 3), 50, np.uint8)
    x, lb = preprocess(img, spec)
    assert np.allclose(x[:, 5, 5], [(50 - 10) / 2, (50 - 20) / 4, (50 - 30) / 5])
    batch, lbs = preprocess_batch([img, img[:, :8]], spec)
    assert batch.shape == (2, 3, 32, 32) and np.allclose(batch[0], x) and lbs[1].src_w == 8
    gray = np.full((16, 16), 50, np.uint8)
    assert np.allclose(preprocess(gray, spec)[0], x)


def test_canvas_then_normalize_is_exactly_preprocess():
    rng = np.random.default_rng(3)
    spec = PreprocessSpec(input_width=64, input_height=48, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    from perception.preprocess import letterbox_canvas, normalize_batch

    imgs = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((30, 90), (200, 100), (48, 64))]
    ref, ref_lbs = preprocess_batch(imgs, spec)
    parts = [letterbox_canvas(i, spec) for i in imgs]
    assert [lb for _, lb in parts] == ref_lbs
    np.testing.assert_array_equal(normalize_batch([c for c, _ in parts], spec), ref)


def test_normalize_matches_the_plain_formula_for_every_colour_order_and_layout():
    """normalize_into splits the canvas into planes (a faster path); the result must be the
    textbook one to the bit: channel order, x * scale, then (x - mean) / std, for contiguous and
    strided canvases alike."""
    from perception.preprocess import normalize_into

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    for canvas in (base[:, :64], np.ascontiguousarray(base[:, :64])):
        for order in ("RGB", "BGR"):
            for mean, std in (((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
                spec = PreprocessSpec(64, 40, color_order=order, scale=1 / 255, mean=mean, std=std)
                src = canvas[:, :, ::-1] if order == "RGB" else canvas
                want = src.transpose(2, 0, 1).astype(np.float32) * np.float32(spec.scale)
                m, s = (np.asarray(v, np.float32).reshape(3, 1, 1) for v in (mean, std))
                want = (want - m) / s
                got = np.empty((3, 40, 64), np.float32)
                normalize_into(canvas, spec, got)
                np.testing.assert_array_equal(got, want)
