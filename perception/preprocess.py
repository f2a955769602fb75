"""The one pre-processing implementation: decoded BGR frame -> model input tensor.

Used by serving, calibration, artifact validation and training-time evaluation alike, so
there is no train/serve skew.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from perception.letterbox import Letterbox, compute_letterbox, letterbox_image
from perception.manifest import PreprocessSpec


def to_bgr(image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Promote a GRAY8 (H, W) or (H, W, 1) image to BGR; BGR passes through."""
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image.reshape(image.shape[0], image.shape[1]), cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) uint8 image, got {image.shape}")


def preprocess_into(
    image_bgr: NDArray[np.uint8], spec: PreprocessSpec, out: NDArray[np.float32]
) -> Letterbox:
    """Write one (3, H, W) float32 model input for ``image_bgr`` into ``out``; return the placement.

    ``image_bgr``: (H, W, 3) uint8 in BGR order (or GRAY8, promoted).
    """
    image_bgr = to_bgr(image_bgr)
    if spec.letterbox:
        canvas, lb = letterbox_image(image_bgr, spec.input_width, spec.input_height, spec.pad_value)
    else:
        src_h, src_w = image_bgr.shape[:2]
        canvas = cv2.resize(image_bgr, (spec.input_width, spec.input_height), interpolation=cv2.INTER_LINEAR)
        lb = Letterbox(src_w, src_h, spec.input_width, spec.input_height, spec.input_width, spec.input_height, 0, 0)
    if spec.color_order == "RGB":
        canvas = canvas[:, :, ::-1]
    chw = canvas.transpose(2, 0, 1)
    np.multiply(chw, np.float32(spec.scale), out=out, casting="unsafe")
    if any(m != 0.0 for m in spec.mean) or any(s != 1.0 for s in spec.std):
        mean = np.asarray(spec.mean, np.float32).reshape(3, 1, 1)
        std = np.asarray(spec.std, np.float32).reshape(3, 1, 1)
        out -= mean
        out /= std
    return lb


def preprocess(image_bgr: NDArray[np.uint8], spec: PreprocessSpec) -> tuple[NDArray[np.float32], Letterbox]:
    """One (3, H, W) float32 model input and its letterbox placement."""
    out = np.empty((3, spec.input_height, spec.input_width), np.float32)
    lb = preprocess_into(image_bgr, spec, out)
    return out, lb


def preprocess_batch(
    images_bgr: list[NDArray[np.uint8]], spec: PreprocessSpec
) -> tuple[NDArray[np.float32], list[Letterbox]]:
    """(B, 3, H, W) float32 input for a list of BGR images, and each image's placement."""
    batch = np.empty((len(images_bgr), 3, spec.input_height, spec.input_width), np.float32)
    lbs = [preprocess_into(img, spec, batch[i]) for i, img in enumerate(images_bgr)]
    return batch, lbs


def identity_letterbox(w: int, h: int) -> Letterbox:
    """The placement of an image that already has the model's input size."""
    return compute_letterbox(w, h, w, h)
