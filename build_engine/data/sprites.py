"""Object sprites: each class drawn as an RGBA image of a given pixel size.

A sprite is drawn at a supersampled size and shrunk with area interpolation, so small, far
objects are anti-aliased like a camera would see them. The alpha channel is the object's
exact silhouette: the label box is the bounding box of alpha >= 128 after compositing.
The look of an object is a function of its ``style`` seed alone, so the same object looks
the same in every frame of a recorded drive.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import cv2
import numpy as np
from numpy.typing import NDArray

# Supersample so a sprite is drawn at least this many pixels tall before shrinking.
DRAW_MIN_HEIGHT = 96

CAR_COLORS = [
    (200, 200, 205), (30, 30, 35), (150, 20, 25), (20, 40, 140), (90, 95, 100), (235, 235, 235), (40, 90, 40),
    (170, 120, 30),
]
BUS_COLORS = [(230, 190, 20), (200, 30, 30), (30, 80, 180), (240, 240, 240), (40, 140, 60)]
TRUCK_COLORS = [(235, 235, 230), (180, 180, 175), (120, 80, 50), (60, 60, 70), (200, 120, 40)]
SHIRTS = [(200, 40, 40), (40, 60, 180), (230, 200, 40), (60, 160, 70), (240, 240, 240), (30, 30, 30), (150, 60, 160)]
SKIN = [(240, 200, 170), (200, 150, 110), (140, 95, 60), (90, 60, 40)]


def _rgb(c: tuple[int, int, int], jitter: float, rng: np.random.Generator) -> tuple[int, int, int]:
    j = rng.uniform(1 - jitter, 1 + jitter, 3)
    r, g, b = (int(np.clip(v * k, 0, 255)) for v, k in zip(c, j, strict=True))
    return r, g, b


def _scaled(c: tuple[int, int, int], k: float) -> tuple[int, int, int]:
    """``c`` darkened (k < 1) by the factor ``k``."""
    r, g, b = c
    return int(r * k), int(g * k), int(b * k)


def _canvas(w: int, h: int) -> tuple[NDArray[np.uint8], float]:
    ss = max(1.0, DRAW_MIN_HEIGHT / max(h, 1))
    W, H = max(2, int(round(w * ss))), max(2, int(round(h * ss)))
    return np.zeros((H, W, 4), np.uint8), ss


def _fill(img: NDArray[np.uint8], pts: list[tuple[float, float]], color: tuple[int, int, int]) -> None:
    H, W = img.shape[:2]
    p = np.array([[x * W, y * H] for x, y in pts], np.float32).round().astype(np.int32)
    cv2.fillPoly(img, [p], (*color, 255), cv2.LINE_AA)


def _rect(img: NDArray[np.uint8], x1: float, y1: float, x2: float, y2: float, color: tuple[int, int, int]) -> None:
    _fill(img, [(x1, y1), (x2, y1), (x2, y2), (x1, y2)], color)


def _ellipse(
    img: NDArray[np.uint8], cx: float, cy: float, rx: float, ry: float, color: tuple[int, int, int], thick: int = -1
) -> None:
    H, W = img.shape[:2]
    t = thick if thick < 0 else max(1, int(thick * H / 100))
    axes = (max(1, int(rx * W)), max(1, int(ry * H)))
    cv2.ellipse(img, (int(cx * W), int(cy * H)), axes, 0, 0, 360, (*color, 255), t, cv2.LINE_AA)


def _line(
    img: NDArray[np.uint8], x1: float, y1: float, x2: float, y2: float, color: tuple[int, int, int], thick: float
) -> None:
    H, W = img.shape[:2]
    p1, p2 = (int(x1 * W), int(y1 * H)), (int(x2 * W), int(y2 * H))
    cv2.line(img, p1, p2, (*color, 255), max(1, int(thick * W)), cv2.LINE_AA)


def draw_car(img: NDArray[np.uint8], rng: np.random.Generator) -> None:
    body = _rgb(CAR_COLORS[rng.integers(len(CAR_COLORS))], 0.1, rng)
    glass = _rgb((70, 90, 110), 0.2, rng)
    roof = rng.uniform(0.0, 0.08)
    _fill(img, [(0.18, roof), (0.82, roof), (0.95, 0.45), (0.05, 0.45)], body)
    _fill(img, [(0.24, roof + 0.07), (0.76, roof + 0.07), (0.86, 0.42), (0.14, 0.42)], glass)
    _rect(img, 0.0, 0.42, 1.0, 0.86, body)
    _rect(img, 0.03, 0.5, 0.2, 0.6, (220, 20, 20))
    _rect(img, 0.8, 0.5, 0.97, 0.6, (220, 20, 20))
    _rect(img, 0.35, 0.62, 0.65, 0.72, (230, 230, 220))
    _rect(img, 0.0, 0.76, 1.0, 0.86, _rgb((40, 40, 40), 0.2, rng))
    _rect(img, 0.05, 0.84, 0.25, 1.0, (15, 15, 15))
    _rect(img, 0.75, 0.84, 0.95, 1.0, (15, 15, 15))


def draw_truck(img: NDArray[np.uint8], rng: np.random.Generator) -> None:
    box = _rgb(TRUCK_COLORS[rng.integers(len(TRUCK_COLORS))], 0.08, rng)
    _rect(img, 0.0, 0.0, 1.0, 0.8, box)
    seam = _scaled(box, 0.6)
    _line(img, 0.5, 0.02, 0.5, 0.78, seam, 0.02)  # the rear doors
    for y in (0.15, 0.4, 0.65):
        _line(img, 0.1, y, 0.9, y, seam, 0.015)
    _rect(img, 0.0, 0.8, 1.0, 0.86, (50, 50, 50))
    _rect(img, 0.02, 0.81, 0.14, 0.85, (220, 30, 20))
    _rect(img, 0.86, 0.81, 0.98, 0.85, (220, 30, 20))
    for x in (0.06, 0.28, 0.56, 0.78):
        _rect(img, x, 0.86, x + 0.16, 1.0, (15, 15, 15))


def draw_bus(img: NDArray[np.uint8], rng: np.random.Generator) -> None:
    body = _rgb(BUS_COLORS[rng.integers(len(BUS_COLORS))], 0.08, rng)
    _rect(img, 0.0, 0.02, 1.0, 0.92, body)
    _fill(img, [(0.05, 0.0), (0.95, 0.0), (1.0, 0.05), (0.0, 0.05)], body)
    _rect(img, 0.2, 0.06, 0.8, 0.13, (20, 20, 20))
    _rect(img, 0.24, 0.07, 0.6, 0.12, (255, 160, 0))  # destination display
    _rect(img, 0.06, 0.17, 0.94, 0.5, _rgb((60, 80, 100), 0.2, rng))
    _line(img, 0.5, 0.17, 0.5, 0.5, body, 0.03)
    _rect(img, 0.04, 0.62, 0.14, 0.72, (230, 30, 20))
    _rect(img, 0.86, 0.62, 0.96, 0.72, (230, 30, 20))
    _rect(img, 0.3, 0.7, 0.7, 0.78, (230, 230, 220))
    _rect(img, 0.0, 0.85, 1.0, 0.92, (40, 40, 40))
    _rect(img, 0.06, 0.9, 0.24, 1.0, (15, 15, 15))
    _rect(img, 0.76, 0.9, 0.94, 1.0, (15, 15, 15))


def _person(
    img: NDArray[np.uint8], rng: np.random.Generator, x0: float, x1: float, y0: float, y1: float, legs: bool,
    phase: float,
) -> None:
    skin = SKIN[rng.integers(len(SKIN))]
    shirt = _rgb(SHIRTS[rng.integers(len(SHIRTS))], 0.1, rng)
    pants = _rgb((40, 45, 70) if rng.random() < 0.6 else (90, 80, 60), 0.2, rng)
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    _ellipse(img, cx, y0 + 0.07 * h, 0.2 * w, 0.07 * h, skin)
    torso = [(cx - 0.3 * w, y0 + 0.15 * h), (cx + 0.3 * w, y0 + 0.15 * h), (cx + 0.26 * w, y0 + 0.52 * h),
             (cx - 0.26 * w, y0 + 0.52 * h)]
    _fill(img, torso, shirt)
    s = 0.25 * math.sin(phase)
    _line(img, cx - 0.28 * w, y0 + 0.18 * h, cx - (0.4 + s) * w, y0 + 0.48 * h, shirt, 0.16 * w)
    _line(img, cx + 0.28 * w, y0 + 0.18 * h, cx + (0.4 - s) * w, y0 + 0.48 * h, shirt, 0.16 * w)
    if legs:
        _line(img, cx - 0.12 * w, y0 + 0.5 * h, cx - (0.15 + s) * w, y1 - 0.02 * h, pants, 0.2 * w)
        _line(img, cx + 0.12 * w, y0 + 0.5 * h, cx + (0.15 + s) * w, y1 - 0.02 * h, pants, 0.2 * w)
        _rect(img, cx - (0.3 + s) * w, y1 - 0.03 * h, cx - (0.02 + s) * w, y1, (20, 20, 20))
        _rect(img, cx + (0.02 - s) * w, y1 - 0.03 * h, cx + (0.3 - s) * w, y1, (20, 20, 20))


def draw_pedestrian(img: NDArray[np.uint8], rng: np.random.Generator, phase: float = 0.0) -> None:
    _person(img, rng, 0.0, 1.0, 0.0, 1.0, legs=True, phase=phase)


def draw_cyclist(img: NDArray[np.uint8], rng: np.random.Generator, phase: float = 0.0) -> None:
    frame = _rgb([(200, 30, 30), (30, 30, 30), (30, 100, 200), (220, 220, 220)][rng.integers(4)], 0.1, rng)
    # Seen from the side: two wheels, frame, rider.
    _ellipse(img, 0.2, 0.8, 0.18, 0.19, (20, 20, 20), thick=4)
    _ellipse(img, 0.8, 0.8, 0.18, 0.19, (20, 20, 20), thick=4)
    _line(img, 0.2, 0.8, 0.45, 0.58, frame, 0.04)
    _line(img, 0.45, 0.58, 0.75, 0.58, frame, 0.04)
    _line(img, 0.75, 0.58, 0.8, 0.8, frame, 0.04)
    _line(img, 0.45, 0.58, 0.5, 0.8, frame, 0.04)
    _line(img, 0.5, 0.8, 0.2, 0.8, frame, 0.03)
    _person(img, rng, 0.3, 0.62, 0.0, 0.62, legs=False, phase=phase)
    _line(img, 0.46, 0.55, 0.5 + 0.08 * math.sin(phase), 0.8, (40, 45, 70), 0.05)


def draw_traffic_light(img: NDArray[np.uint8], rng: np.random.Generator, state: int = -1) -> None:
    _rect(img, 0.0, 0.0, 1.0, 1.0, _rgb((35, 35, 35), 0.2, rng))
    lit = int(rng.integers(3)) if state < 0 else state
    colors = [(255, 40, 30), (255, 190, 20), (40, 230, 90)]
    for i, c in enumerate(colors):
        col = c if i == lit else _scaled(c, 0.22)
        _ellipse(img, 0.5, 0.18 + 0.32 * i, 0.32, 0.12, col)


def draw_traffic_sign(img: NDArray[np.uint8], rng: np.random.Generator) -> None:
    kind = int(rng.integers(4))
    if kind == 0:  # round prohibition / speed limit
        _ellipse(img, 0.5, 0.5, 0.5, 0.5, (210, 20, 20))
        _ellipse(img, 0.5, 0.5, 0.38, 0.38, (245, 245, 245))
        _rect(img, 0.32, 0.36, 0.46, 0.64, (20, 20, 20))
        _rect(img, 0.54, 0.36, 0.68, 0.64, (20, 20, 20))
    elif kind == 1:  # warning triangle
        _fill(img, [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)], (210, 20, 20))
        _fill(img, [(0.5, 0.22), (0.84, 0.9), (0.16, 0.9)], (245, 245, 245))
        _rect(img, 0.46, 0.45, 0.54, 0.75, (20, 20, 20))
    elif kind == 2:  # blue mandatory
        _rect(img, 0.0, 0.0, 1.0, 1.0, (20, 70, 190))
        arrow = [(0.5, 0.15), (0.8, 0.5), (0.6, 0.5), (0.6, 0.85), (0.4, 0.85), (0.4, 0.5), (0.2, 0.5)]
        _fill(img, arrow, (245, 245, 245))
    else:  # stop octagon
        angles = [math.pi / 8 + k * math.pi / 4 for k in range(8)]
        pts = [(0.5 + 0.5 * math.cos(a), 0.5 + 0.5 * math.sin(a)) for a in angles]
        _fill(img, pts, (200, 15, 15))
        _rect(img, 0.2, 0.44, 0.8, 0.56, (245, 245, 245))


def draw_tree(img: NDArray[np.uint8], rng: np.random.Generator) -> None:
    _rect(img, 0.44, 0.55, 0.56, 1.0, (90, 60, 35))
    g = _rgb((40, 110, 40), 0.25, rng)
    _ellipse(img, 0.5, 0.35, 0.48, 0.34, g)
    _ellipse(img, 0.35, 0.45, 0.3, 0.2, _scaled(g, 0.8))


def draw_pole(img: NDArray[np.uint8], rng: np.random.Generator) -> None:
    _rect(img, 0.3, 0.0, 0.7, 1.0, _rgb((120, 120, 120), 0.15, rng))


# Objects that look the same in every frame: drawn from their style seed alone.
DRAWERS: dict[str, Callable[[NDArray[np.uint8], np.random.Generator], None]] = {
    "car": draw_car,
    "truck": draw_truck,
    "bus": draw_bus,
    "traffic_light": draw_traffic_light,
    "traffic_sign": draw_traffic_sign,
    "tree": draw_tree,
    "pole": draw_pole,
}
# Objects that move their limbs: also drawn at a gait ``phase`` (radians).
ANIMATED_DRAWERS: dict[str, Callable[[NDArray[np.uint8], np.random.Generator, float], None]] = {
    "pedestrian": draw_pedestrian,
    "cyclist": draw_cyclist,
}


def render_sprite(kind: str, w: int, h: int, style: int, phase: float = 0.0) -> NDArray[np.uint8]:
    """(h, w, 4) RGBA sprite of ``kind`` (a class name, or "tree"/"pole" distractors)."""
    img, _ = _canvas(w, h)
    rng = np.random.default_rng(style)
    if kind in ANIMATED_DRAWERS:
        ANIMATED_DRAWERS[kind](img, rng, phase)
    else:
        DRAWERS[kind](img, rng)
    if img.shape[0] != h or img.shape[1] != w:
        # resize keeps the uint8 depth; cv2's stubs type every result as the generic MatLike.
        img = cast(NDArray[np.uint8], cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA))
    return img
