"""Generate a labelled road-scene dataset: JPEG images + COCO JSON + YOLO txt."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import cv2

from build_engine.data.formats import Sample, write_coco, write_yolo
from build_engine.data.scene import random_image
from build_engine.model.config import DEFAULT_CLASSES

log = logging.getLogger(__name__)
JPEG_QUALITY = 92


def generate_dataset(
    out_dir: str | os.PathLike[str],
    num_images: int,
    seed: int = 0,
    width: int = 640,
    height: int = 360,
    progress: bool = False,
    min_object_px: float = 0.0,
) -> Path:
    """Write ``out_dir/images/*.jpg``, ``annotations.json`` (COCO), ``labels/*.txt`` +
    ``classes.txt`` (YOLO). Image ``i`` depends only on (seed, i, min_object_px): same seed,
    same dataset. ``min_object_px`` > 0 places objects out to where they are that many pixels
    tall (default 0: 11-16 px by class). Returns ``out_dir``.
    """
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    it: Iterable[int] = range(num_images)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="gen-data", unit="img")
    for i in it:
        r = random_image(seed * 1_000_003 + i, width, height, min_object_px)
        f = root / "images" / f"{i:06d}.jpg"
        cv2.imwrite(str(f), r.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        samples.append(Sample(i + 1, f, width, height, r.boxes, r.class_ids))
    write_coco(root / "annotations.json", samples, DEFAULT_CLASSES, root)
    write_yolo(root, samples, DEFAULT_CLASSES)
    n = sum(len(s.boxes) for s in samples)
    log.info("wrote %d images with %d objects to %s", num_images, n, root)
    return root


def dataset_dir(
    cache_dir: str | os.PathLike[str], split: str, n: int, seed: int, width: int, height: int,
    min_object_px: float = 0.0,
) -> Path:
    """Where ``cached_dataset`` keeps a generated split (``~`` expanded)."""
    # "l2": labelled down to FAR_MIN_LABEL_PX; a cache made before (its thin objects unlabelled)
    # is not reused.
    far = f"-far{min_object_px:g}l2" if min_object_px > 0 else ""
    return Path(cache_dir).expanduser() / f"{split}-s{seed}-n{n}-{width}x{height}{far}"


def cached_dataset(
    cache_dir: str | os.PathLike[str], split: str, n: int, seed: int, width: int, height: int, progress: bool = False,
    min_object_px: float = 0.0,
) -> Path:
    """``cache_dir/<split>-s<seed>-n<n>-<w>x<h>`` (``-far<px>`` appended when ``min_object_px``
    is set), generated once: a ``.complete`` marker is written last, so an interrupted
    generation is redone rather than read half-written."""
    root = dataset_dir(cache_dir, split, n, seed, width, height, min_object_px)
    if not (root / ".complete").is_file():
        log.info("generating %d %s images into %s", n, split, root)
        generate_dataset(root, n, seed, width, height, progress=progress, min_object_px=min_object_px)
        (root / ".complete").write_text("ok\n")
    return root
