"""Letterbox maths: a box mapped to model space and back lands where it started."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perception.letterbox import boxes_to_model, boxes_to_source, compute_letterbox, letterbox_image


@pytest.mark.parametrize(
    "src,dst",
    [
        ((1920, 1080), (640, 384)),  # landscape into landscape, pad top/bottom
        ((1080, 1920), (640, 384)),  # portrait into landscape, pad left/right
        ((641, 383), (640, 384)),  # odd sizes, barely any scaling
        ((333, 777), (320, 320)),  # odd portrait into square
        ((101, 57), (640, 384)),  # upscaling
    ],
)
def test_round_trip_exact(src: tuple[int, int], dst: tuple[int, int]) -> None:
    lb = compute_letterbox(*src, *dst)
    rng = np.random.default_rng(0)
    xy1 = rng.uniform(0, 1, (50, 2)) * np.array(src) * 0.8
    wh = rng.uniform(0.01, 0.2, (50, 2)) * np.array(src)
    boxes = np.concatenate([xy1, np.minimum(xy1 + wh, np.array(src))], axis=1).astype(np.float32)
    back = boxes_to_source(boxes_to_model(boxes, lb), lb, clip=False)
    np.testing.assert_allclose(back, boxes, atol=1e-3)


@given(
    sw=st.integers(1, 4000), sh=st.integers(1, 4000), dw=st.integers(8, 1280), dh=st.integers(8, 1280)
)
@settings(max_examples=200, deadline=None)
def test_placement_fits_and_is_centered(sw: int, sh: int, dw: int, dh: int) -> None:
    lb = compute_letterbox(sw, sh, dw, dh)
    assert 1 <= lb.new_w <= dw and 1 <= lb.new_h <= dh
    assert lb.pad_left + lb.new_w <= dw and lb.pad_top + lb.new_h <= dh
    # one side fills the input (up to rounding), padding is symmetric to a pixel
    assert lb.new_w == dw or lb.new_h == dh or abs(lb.new_w / sw - lb.new_h / sh) < 2 / min(sw, sh) + 1e-9
    assert abs((dw - lb.new_w - lb.pad_left) - lb.pad_left) <= 1
    assert abs((dh - lb.new_h - lb.pad_top) - lb.pad_top) <= 1
    # source corners map onto the placed image's corners
    corners = np.array([[0, 0, sw, sh]], np.float32)
    m = boxes_to_model(corners, lb)[0]
    np.testing.assert_allclose(m, [lb.pad_left, lb.pad_top, lb.pad_left + lb.new_w, lb.pad_top + lb.new_h], atol=1e-3)


def test_letterbox_image_pixels_land_where_the_box_says() -> None:
    src = np.zeros((300, 500, 3), np.uint8)
    src[100:200, 200:300] = 255  # a white square
    canvas, lb = letterbox_image(src, 320, 320, pad_value=114)
    assert canvas.shape == (320, 320, 3)
    assert (canvas[: lb.pad_top] == 114).all() and (canvas[lb.pad_top + lb.new_h :] == 114).all()
    x1, y1, x2, y2 = boxes_to_model(np.array([[200, 100, 300, 200]]), lb)[0]
    inside = canvas[int(y1) + 2 : int(y2) - 2, int(x1) + 2 : int(x2) - 2]
    assert inside.min() > 200
    assert canvas[int(y2) + 3, int(x2) + 3].max() < 50


def test_clip_keeps_boxes_inside_source() -> None:
    lb = compute_letterbox(200, 100, 64, 64)
    out = boxes_to_source(np.array([[-10, -10, 80, 80]], np.float32), lb, clip=True)
    assert out.min() >= 0 and out[0, 2] <= 200 and out[0, 3] <= 100


def test_rejects_non_positive_sizes() -> None:
    with pytest.raises(ValueError):
        compute_letterbox(0, 10, 64, 64)
