"""perception.boxes: the IoU matrix against a scalar reference."""

from __future__ import annotations

import numpy as np
import pytest

from perception.boxes import box_iou


def reference_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 100, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(-5, 40, (n, 2))], axis=1)  # some inverted or empty
    boxes[: n // 4, 2:] = boxes[: n // 4, :2]  # degenerate: zero area
    return boxes


@pytest.mark.parametrize("seed", range(5))
def test_box_iou_matches_the_scalar_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = random_boxes(rng, 12), random_boxes(rng, 9)
    iou = box_iou(a, b)
    assert iou.shape == (12, 9) and iou.dtype == np.float32
    a32, b32 = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    want = np.array([[reference_iou(x, y) for y in b32] for x in a32])
    np.testing.assert_allclose(iou, want, rtol=1e-5, atol=1e-6)
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 9)


def reference_iou_float32(a: np.ndarray, b: np.ndarray) -> np.float32:
    """The IoU in float32 scalar operations, in the order the kernel does them: its values to
    the bit, whatever the kernel's array layout."""
    zero = np.float32(0)
    w = max(min(a[2], b[2]) - max(a[0], b[0]), zero)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), zero)
    inter = w * h
    union = (max(a[2] - a[0], zero) * max(a[3] - a[1], zero) + max(b[2] - b[0], zero) * max(b[3] - b[1], zero)) - inter
    return inter / union if union > 0 else zero


@pytest.mark.parametrize("seed", range(3))
def test_box_iou_is_the_float32_reference_to_the_bit(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    a, b = random_boxes(rng, 17).astype(np.float32), random_boxes(rng, 11).astype(np.float32)
    a[0], b[0] = a[1], a[1]  # identical boxes: IoU 1
    want = np.array([[reference_iou_float32(x, y) for y in b] for x in a], np.float32)
    assert np.array_equal(box_iou(a, b), want)
    assert np.array_equal(box_iou(a[::-1], b[::-1]), want[::-1, ::-1])


