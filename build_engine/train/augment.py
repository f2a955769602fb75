"""Training-time augmentation: random scale / translate / flip into the model's input canvas
(a letterbox with pad value 114, like serving), and HSV jitter. Boxes follow exactly.
"""

from __future__ import annotations

from typing import cast

import cv2
import numpy as np
from numpy.typing import NDArray

from build_engine.config import AugmentConfig

PAD_VALUE = 114


def random_affine(
    image: NDArray[np.uint8], boxes: NDArray[np.float32], out_w: int, out_h: int,
    cfg: AugmentConfig, rng: np.random.Generator | None,
) -> tuple[NDArray[np.uint8], NDArray[np.float32], NDArray[np.bool_]]:
    """Place ``image`` (H, W, 3) on an (out_h, out_w) canvas; without ``rng`` a plain letterbox.

    Returns (canvas, boxes (N, 4) xyxy canvas px, keep (N,) mask of boxes still usable).
    """
    h, w = image.shape[:2]
    s = min(out_w / w, out_h / h)
    flip = False
    tx, ty = 0.0, 0.0
    if rng is not None:
        s *= float(rng.uniform(cfg.scale_min, cfg.scale_max))
        tx = float(rng.uniform(-cfg.translate, cfg.translate)) * out_w
        ty = float(rng.uniform(-cfg.translate, cfg.translate)) * out_h
        flip = bool(rng.random() < cfg.flip)
    sx = -s if flip else s
    cx, cy = out_w / 2 + tx, out_h / 2 + ty
    m = np.array([[sx, 0, cx - sx * w / 2], [0, s, cy - s * h / 2]], np.float32)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    # warpAffine keeps the uint8 depth of its input; cv2's stubs type every result as MatLike.
    canvas = cast(NDArray[np.uint8], cv2.warpAffine(image, m, (out_w, out_h), flags=interp,
                                                    borderValue=(PAD_VALUE,) * 3))
    if len(boxes) == 0:
        return canvas, boxes.reshape(0, 4), np.zeros(0, bool)
    xs = boxes[:, [0, 2]] * sx + m[0, 2]
    ys = boxes[:, [1, 3]] * s + m[1, 2]
    nb = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], 1).astype(np.float32)
    area0 = (nb[:, 2] - nb[:, 0]) * (nb[:, 3] - nb[:, 1])
    nb[:, [0, 2]] = nb[:, [0, 2]].clip(0, out_w)
    nb[:, [1, 3]] = nb[:, [1, 3]].clip(0, out_h)
    bw, bh = nb[:, 2] - nb[:, 0], nb[:, 3] - nb[:, 1]
    keep = (bw >= cfg.min_box_px) & (bh >= cfg.min_box_px) & (bw * bh >= cfg.min_visible * np.maximum(area0, 1e-6))
    return canvas, nb, keep


def hsv_jitter(image: NDArray[np.uint8], cfg: AugmentConfig, rng: np.random.Generator) -> NDArray[np.uint8]:
    """Random hue / saturation / value gains (BGR in, BGR out)."""
    if cfg.hsv_h == cfg.hsv_s == cfg.hsv_v == 0:
        return image
    g = rng.uniform(-1, 1, 3) * [cfg.hsv_h, cfg.hsv_s, cfg.hsv_v] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * g[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * g[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * g[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    return cast(NDArray[np.uint8], cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR))  # uint8 in, uint8 out
