"""Road scenes: a small 3-D world (road, lanes, objects on the ground plane) seen by a
pinhole camera, rendered with OpenCV, with exact labels.

World frame: X right, Y up, Z forward from the camera, metres; the ground is Y = 0 and the
camera sits at height ``cam_height``. An object stands on the ground (or, for lights and
signs, is mounted at ``elevation`` metres) and faces the camera. Objects are drawn far to
near, so nearer ones occlude farther ones; each label box is the bounding box of the object's
*visible* pixels (an id map is kept while compositing), so boxes fit what can be seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import cv2
import numpy as np
from numpy.typing import NDArray

from build_engine.data.sprites import render_sprite
from build_engine.model.config import DEFAULT_CLASSES

# Physical (width, height) in metres, and (min, max) of each.
CLASS_SIZES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "car": ((1.7, 2.0), (1.4, 1.7)),
    "truck": ((2.4, 2.6), (3.2, 4.0)),
    "bus": ((2.5, 2.6), (2.9, 3.3)),
    "pedestrian": ((0.45, 0.6), (1.55, 1.9)),
    "cyclist": ((1.6, 1.8), (1.6, 1.85)),
    "traffic_light": ((0.32, 0.4), (0.9, 1.1)),
    "traffic_sign": ((0.6, 0.9), (0.6, 0.9)),
    "tree": ((2.5, 4.5), (4.0, 7.0)),
    "pole": ((0.15, 0.25), (4.0, 7.0)),
}
LANE_WIDTH = 3.5
ROAD_HALF = 2 * LANE_WIDTH
# Labels smaller than this (visible pixels) are dropped as unrecognisable; objects are
# placed so that this is rare (see ``max_distance``).
MIN_LABEL_PX = 4
# ... except in images placing objects down to a few pixels tall (``min_px``): there a side
# down to this is labelled. With the default floor, a pedestrian drawn 6 px tall (2.4 px wide)
# went unlabelled: at ``min_px`` 6, 76 of 435 objects drawn, taught as background.
FAR_MIN_LABEL_PX = 2
# A label needs at least this fraction of its object visible.
MIN_VISIBLE_FRACTION = 0.3


@dataclass
class WorldObject:
    """One object in the world. ``kind`` is a class name or a distractor ("tree", "pole")."""

    kind: str
    x: float  # lateral position of the centre, metres
    z: float  # distance along the road, metres (world frame)
    width: float
    height: float
    elevation: float = 0.0  # height of the object's bottom above the ground
    vx: float = 0.0  # metres / second
    vz: float = 0.0
    style: int = 0  # appearance seed
    track_id: int = 0

    @property
    def labelled(self) -> bool:
        return self.kind in DEFAULT_CLASSES


@dataclass(frozen=True)
class Camera:
    """A pinhole camera looking along +Z (or -Z for ``facing=-1``) from (x0, cam_height, z0)."""

    width: int
    height: int
    focal: float
    horizon: float  # image row of the horizon
    cx: float  # image column of the vanishing point
    cam_height: float = 1.5
    facing: int = 1
    x0: float = 0.0  # lateral position of the camera in the world

    def project(self, x: float, y: float, z_rel: float) -> tuple[float, float]:
        """Image (u, v) of a world point at lateral x, height y, ``z_rel`` (> 0) metres ahead of
        the camera along its viewing direction (a rear camera sees the world mirrored)."""
        u = self.cx + self.focal * (x - self.x0) * self.facing / z_rel
        v = self.horizon + self.focal * (self.cam_height - y) / z_rel
        return u, v

    def max_distance(self, height_m: float, min_px: float = 10.0) -> float:
        """Farthest distance at which an object of this height is still ``min_px`` tall."""
        return self.focal * height_m / min_px


def _rgb(values: Iterable[int]) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in values)
    return r, g, b


@dataclass(frozen=True)
class Look:
    """Scene-wide appearance: sky, lighting and sensor effects."""

    sky_top: tuple[int, int, int]
    sky_bottom: tuple[int, int, int]
    ground: tuple[int, int, int]
    road: tuple[int, int, int]
    brightness: float = 1.0
    contrast: float = 1.0
    blur_sigma: float = 0.0
    motion_blur: int = 0
    noise_sigma: float = 0.0
    shadows: int = 0
    buildings: int = 0
    seed: int = 0

    @classmethod
    def random(cls, rng: np.random.Generator) -> Look:
        dusk = rng.random() < 0.25
        sky_top = (40, 60, 110) if dusk else _rgb(rng.integers([60, 110, 170], [120, 170, 235]))
        sky_bottom = (230, 150, 90) if dusk else _rgb(rng.integers([170, 190, 200], [230, 230, 250]))
        g = rng.integers(60, 130)
        road_grey = int(rng.integers(70, 120))
        return cls(
            sky_top=sky_top,
            sky_bottom=sky_bottom,
            ground=(int(g * 0.8), int(g * 1.1), int(g * 0.6)),
            road=(road_grey, road_grey, road_grey),
            brightness=float(rng.uniform(0.45, 0.8) if dusk else rng.uniform(0.75, 1.25)),
            contrast=float(rng.uniform(0.7, 1.2)),
            blur_sigma=float(rng.uniform(0.4, 1.2)) if rng.random() < 0.3 else 0.0,
            motion_blur=int(rng.integers(3, 7)) if rng.random() < 0.15 else 0,
            noise_sigma=float(rng.uniform(0, 8)),
            shadows=int(rng.integers(0, 4)),
            buildings=int(rng.integers(0, 12)),
            seed=int(rng.integers(1 << 31)),
        )


@dataclass
class Rendered:
    """A rendered frame: BGR image and its labels (xyxy pixel boxes, class ids, track ids)."""

    image: NDArray[np.uint8]
    boxes: NDArray[np.float32]
    class_ids: NDArray[np.int64]
    track_ids: list[int] = field(default_factory=list)


def _background(cam: Camera, look: Look, travelled: float) -> NDArray[np.float32]:
    W, H = cam.width, cam.height
    img: NDArray[np.float32] = np.zeros((H, W, 3), np.float32)
    hz = int(round(cam.horizon))
    t = np.linspace(0, 1, max(hz, 1))[:, None]
    sky = (1 - t) * np.array(look.sky_top, np.float32) + t * np.array(look.sky_bottom, np.float32)
    img[:hz] = sky[:, None, :]
    img[hz:] = look.ground
    rng = np.random.default_rng(look.seed)
    for _ in range(look.buildings):  # distant buildings on the horizon; they drift slowly
        bw = rng.uniform(0.03, 0.12) * W
        bh = rng.uniform(0.03, 0.15) * H
        bx = (rng.uniform(-0.1, 1.1) * W - travelled * 0.3 * cam.facing) % (W * 1.2) - 0.1 * W
        shade = rng.integers(90, 180)
        colour = (float(shade), float(shade * 0.95), float(shade * 0.9))
        cv2.rectangle(img, (int(bx), int(hz - bh)), (int(bx + bw), hz), colour, -1)
    # Road surface and shoulders: a trapezoid from the bottom row to the vanishing point.
    z_near = cam.focal * cam.cam_height / max(H - cam.horizon, 1)
    def px(x: float, z: float) -> tuple[int, int]:
        u, v = cam.project(x, 0.0, z)
        return int(round(u)), int(round(v))
    far = 2000.0
    side = [px(-ROAD_HALF - 3, z_near), px(-ROAD_HALF - 3, far), px(ROAD_HALF + 3, far), px(ROAD_HALF + 3, z_near)]
    cv2.fillPoly(img, [np.array(side)], (150.0, 150.0, 145.0), cv2.LINE_AA)
    road = [px(-ROAD_HALF, z_near), px(-ROAD_HALF, far), px(ROAD_HALF, far), px(ROAD_HALF, z_near)]
    cv2.fillPoly(img, [np.array(road)], tuple(float(v) for v in look.road), cv2.LINE_AA)
    for _ in range(look.shadows):
        zs = rng.uniform(z_near, 40)
        xs = rng.uniform(-ROAD_HALF, ROAD_HALF)
        poly = [px(xs, zs), px(xs + rng.uniform(2, 6), zs), px(xs + rng.uniform(2, 6), zs + rng.uniform(3, 10)),
                px(xs, zs + 5)]
        overlay = img.copy()
        cv2.fillPoly(overlay, [np.array(poly)], (0.0, 0.0, 0.0))
        # cv2 keeps the float32 depth; its stubs type every result as the generic MatLike.
        img = cast(NDArray[np.float32], cv2.addWeighted(img, 0.65, overlay, 0.35, 0))
    # Lane markings: solid edges, dashed lane lines whose phase follows the distance driven.
    white = (235.0, 235.0, 235.0)
    for x in (-ROAD_HALF + 0.15, ROAD_HALF - 0.15):
        cv2.line(img, px(x, z_near), px(x, far), white, max(1, W // 400), cv2.LINE_AA)
    dash, gap = 3.0, 6.0
    phase = (travelled * cam.facing) % (dash + gap)
    for x in (-LANE_WIDTH, 0.0, LANE_WIDTH):
        color = (40.0, 200.0, 230.0) if x == 0.0 else white  # a yellow centre line
        z = z_near - phase
        while z < 150:
            z0, z1 = max(z, z_near), z + dash
            if z1 > z_near:
                a, b = px(x - 0.08, z0), px(x + 0.08, z0)
                c, d = px(x + 0.08, z1), px(x - 0.08, z1)
                cv2.fillPoly(img, [np.array([a, b, c, d])], color, cv2.LINE_AA)
            z += dash + gap
    return img


def render(
    objects: list[WorldObject], cam: Camera, look: Look, ego_z: float = 0.0, time_s: float = 0.0,
    noise_seed: int | None = None, min_label_px: float = MIN_LABEL_PX,
) -> Rendered:
    """Render the objects (world z relative to an ego at ``ego_z``) as seen by ``cam``.

    ``noise_seed`` varies the sensor noise per frame (default: fixed by ``look.seed``);
    ``min_label_px``: the smallest side of a box that is labelled.
    """
    W, H = cam.width, cam.height
    img = _background(cam, look, ego_z)
    ids = np.zeros((H, W), np.int32)
    placed: list[tuple[WorldObject, tuple[int, int, int, int], int]] = []
    visible = [(o, (o.z - ego_z) * cam.facing) for o in objects]
    visible = [(o, z) for o, z in visible if z > 1.0]
    visible.sort(key=lambda oz: -oz[1])  # painter's order: far to near
    for o, z in visible:
        u_a, v_bottom = cam.project(o.x - o.width / 2, o.elevation, z)
        u_b, v_top = cam.project(o.x + o.width / 2, o.elevation + o.height, z)
        u_left, u_right = min(u_a, u_b), max(u_a, u_b)
        x1, y1, x2, y2 = int(round(u_left)), int(round(v_top)), int(round(u_right)), int(round(v_bottom))
        w, h = x2 - x1, y2 - y1
        if w < 2 or h < 2 or x2 <= 0 or y2 <= 0 or x1 >= W or y1 >= H or h > 4 * H:
            continue
        if o.kind in ("traffic_light", "traffic_sign"):  # the pole under the sign or light
            pu, pv = cam.project(o.x, 0.0, z)
            pw = max(1, int(round(cam.focal * 0.12 / z)))
            cv2.rectangle(img, (int(pu) - pw // 2, y2), (int(pu) + pw // 2, int(pv)), (110.0, 110.0, 110.0), -1)
            ids[max(y2, 0):max(int(pv), 0), max(int(pu) - pw // 2, 0):max(int(pu) + pw // 2 + 1, 0)] = 0
        phase = 2 * math.pi * (time_s * 1.5 + o.style % 7 / 7)
        sprite = render_sprite(o.kind, w, h, o.style, phase).astype(np.float32)
        sx1, sy1, sx2, sy2 = max(0, -x1), max(0, -y1), w - max(0, x2 - W), h - max(0, y2 - H)
        sub = sprite[sy1:sy2, sx1:sx2]
        a = sub[..., 3:4] / 255.0
        region = img[y1 + sy1:y1 + sy2, x1 + sx1:x1 + sx2]
        region[:] = region * (1 - a) + sub[..., 2::-1] * a  # sprites are RGB, the canvas BGR
        mask = sub[..., 3] >= 128
        id_region = ids[y1 + sy1:y1 + sy2, x1 + sx1:x1 + sx2]
        label = len(placed) + 1
        id_region[mask] = label if o.labelled else 0
        placed.append((o, (x1, y1, x2, y2), int(mask.sum())))
    boxes, classes, tracks = [], [], []
    for label, (o, _, full_area) in enumerate(placed, start=1):
        if not o.labelled or full_area == 0:
            continue
        ys, xs = np.nonzero(ids == label)
        if xs.size == 0 or xs.size < MIN_VISIBLE_FRACTION * full_area:
            continue
        bx1, by1, bx2, by2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        if bx2 - bx1 < min_label_px or by2 - by1 < min_label_px:
            continue
        boxes.append((bx1, by1, bx2, by2))
        classes.append(DEFAULT_CLASSES.index(o.kind))
        tracks.append(o.track_id)
    return Rendered(
        image=_sensor(img, look, noise_seed),
        boxes=np.array(boxes, np.float32).reshape(-1, 4),
        class_ids=np.array(classes, np.int64),
        track_ids=tracks,
    )


def _sensor(img: NDArray[np.float32], look: Look, noise_seed: int | None = None) -> NDArray[np.uint8]:
    """Lighting, blur and noise: what the camera does to the scene."""
    rng = np.random.default_rng(look.seed + 1 if noise_seed is None else noise_seed)
    img = (img - 128.0) * look.contrast + 128.0
    img = img * look.brightness
    # cv2 keeps the float32 depth (filter2D: ddepth -1); its stubs type every result as MatLike.
    if look.blur_sigma > 0:
        img = cast(NDArray[np.float32], cv2.GaussianBlur(img, (0, 0), look.blur_sigma))
    if look.motion_blur > 1:
        k = np.zeros((look.motion_blur, look.motion_blur), np.float32)
        k[look.motion_blur // 2, :] = 1.0 / look.motion_blur
        img = cast(NDArray[np.float32], cv2.filter2D(img, -1, k))
    if look.noise_sigma > 0:
        img = img + rng.normal(0, look.noise_sigma, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def random_camera(rng: np.random.Generator, width: int, height: int) -> Camera:
    """A forward camera with some pitch (horizon) and yaw (vanishing point) jitter."""
    return Camera(
        width=width,
        height=height,
        focal=width * float(rng.uniform(0.7, 0.95)),
        horizon=height * float(rng.uniform(0.38, 0.5)),
        cx=width * float(rng.uniform(0.42, 0.58)),
        cam_height=float(rng.uniform(1.3, 1.7)),
    )


def _floor(class_px: float, min_px: float) -> float:
    return min(class_px, min_px) if min_px > 0 else class_px


def _far_biased(rng: np.random.Generator, lo: float, hi: float) -> float:
    # biased towards far: many small objects, as in real driving data.
    return lo + (hi - lo) * float(rng.random()) ** 0.85


def random_object(
    kind: str, rng: np.random.Generator, cam: Camera, track_id: int = 0, z_min: float = 4.0, min_px: float = 0.0
) -> WorldObject:
    """An object of ``kind`` at a plausible place on or beside the road.

    A road user, light or sign is placed no farther than where it is still 11-16 pixels tall
    (by class), or ``min_px`` tall when that is smaller (0: the class's own floor): a lower
    floor puts far, small objects in the images."""
    (w0, w1), (h0, h1) = CLASS_SIZES[kind]
    w, h = float(rng.uniform(w0, w1)), float(rng.uniform(h0, h1))
    elevation = 0.0
    if kind in ("car", "truck", "bus"):
        x = float(rng.choice([-1.5, -0.5, 0.5, 1.5])) * LANE_WIDTH + float(rng.normal(0, 0.3))
        z_max = cam.max_distance(h, _floor(12.0, min_px))
    elif kind in ("pedestrian", "cyclist"):
        x = float(rng.choice([-1, 1])) * float(rng.uniform(ROAD_HALF - 0.5, ROAD_HALF + 3))
        if rng.random() < 0.2:  # crossing the road
            x = float(rng.uniform(-ROAD_HALF, ROAD_HALF))
        z_max = cam.max_distance(h, _floor(16.0, min_px))
    elif kind == "traffic_light":
        x = float(rng.choice([-1, 1])) * float(rng.uniform(ROAD_HALF + 0.5, ROAD_HALF + 2))
        elevation = float(rng.uniform(3.5, 5.0))
        z_max = cam.max_distance(h, _floor(12.0, min_px))
    elif kind == "traffic_sign":
        x = float(rng.choice([-1, 1])) * float(rng.uniform(ROAD_HALF + 0.5, ROAD_HALF + 2.5))
        elevation = float(rng.uniform(1.8, 2.6))
        z_max = cam.max_distance(h, _floor(11.0, min_px))
    else:  # distractors beyond the shoulder
        x = float(rng.choice([-1, 1])) * float(rng.uniform(ROAD_HALF + 3.5, ROAD_HALF + 12))
        z_max = 120.0
    z = _far_biased(rng, z_min, max(z_min + 1, z_max))
    return WorldObject(kind, x, z, w, h, elevation, style=int(rng.integers(1 << 31)), track_id=track_id)


CLASS_WEIGHTS = {
    "car": 5, "truck": 1.5, "bus": 1.2, "pedestrian": 3, "cyclist": 1.5, "traffic_light": 2, "traffic_sign": 2,
}


def random_scene(
    rng: np.random.Generator, cam: Camera, min_objects: int = 3, max_objects: int = 14, min_px: float = 0.0
) -> list[WorldObject]:
    """A random set of objects and distractors for one still image (``min_px``: random_object's)."""
    kinds = list(CLASS_WEIGHTS)
    p = np.array([CLASS_WEIGHTS[k] for k in kinds], np.float64)
    n = int(rng.integers(min_objects, max_objects + 1))
    picks = rng.choice(len(kinds), n, p=p / p.sum())
    objs = [random_object(kinds[i], rng, cam, t + 1, min_px=min_px) for t, i in enumerate(picks)]
    objs += [random_object(str(rng.choice(["tree", "pole"])), rng, cam) for _ in range(int(rng.integers(0, 6)))]
    return objs


def random_image(seed: int, width: int, height: int, min_px: float = 0.0) -> Rendered:
    """One labelled still image, fully determined by ``seed`` (and ``min_px``: random_object's)."""
    rng = np.random.default_rng(seed)
    cam = random_camera(rng, width, height)
    return render(random_scene(rng, cam, min_px=min_px), cam, Look.random(rng), time_s=float(rng.uniform(0, 10)),
                  min_label_px=FAR_MIN_LABEL_PX if min_px > 0 else MIN_LABEL_PX)
