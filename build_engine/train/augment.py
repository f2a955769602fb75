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

    Returns (canvas, boxes (N, 4) xyxy canvas px, keep (N,) mask of boxes still usable as
    targets). The draws from ``rng`` do not depend on ``boxes``: any boxes (targets and ignore
    regions together) move as the image does.
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
    # Box (edge) coordinates: u' = sx * u + m[0, 2], v' = s * v + m[1, 2].
    m = np.array([[sx, 0, cx - sx * w / 2], [0, s, cy - s * h / 2]], np.float32)
    canvas = _warp(image, m, out_w, out_h)
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


def _warp(image: NDArray[np.uint8], m: NDArray[np.float32], out_w: int, out_h: int) -> NDArray[np.uint8]:
    """``image`` warped by ``m``, an axis-aligned map in edge coordinates (pixel i spans
    [i, i + 1), as boxes do), onto an (out_h, out_w) canvas padded with ``PAD_VALUE``.

    warpAffine maps pixel indices (centres at integers), so each axis's offset is shifted by
    0.5 * (1 - scale): without it a flipped image (scale -s) lands ~1 px left of its boxes.
    warpAffine also samples bilinearly whatever flag it gets (INTER_AREA included), which
    aliases large downscales; serving (``perception.letterbox``) area-averages downscales by
    2x or more, so those are first area-resized to about the target scale here too, and only
    the rest (flip, fractional scale, shift) is warped.
    """
    h, w = image.shape[:2]
    m = m.astype(np.float64)
    scale = abs(float(m[0, 0]))
    if scale <= 0.5:
        rw, rh = max(1, round(w * scale)), max(1, round(h * abs(float(m[1, 1]))))
        # resize keeps the uint8 depth; cv2's stubs type every result as MatLike.
        image = cast(NDArray[np.uint8], cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA))
        m[0, 0] *= w / rw  # edge coordinates of the resized image are u * rw / w
        m[1, 1] *= h / rh
    idx = m.copy()
    idx[0, 2] -= 0.5 * (1 - m[0, 0])
    idx[1, 2] -= 0.5 * (1 - m[1, 1])
    # warpAffine keeps the uint8 depth of its input.
    return cast(NDArray[np.uint8], cv2.warpAffine(image, idx, (out_w, out_h), flags=cv2.INTER_LINEAR,
                                                  borderValue=(PAD_VALUE,) * 3))


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
