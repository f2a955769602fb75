"""COCO detection JSON: loading and validation, shared by the client (replay KPI) and the build
stage (datasets, evaluation).

Every defect is a ``DataError`` naming the file and the record (``images[3]``,
``annotations[17] (id 42)``): nothing is silently skipped.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
from numpy.typing import NDArray

from perception.errors import DataError


@dataclass(frozen=True)
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CocoDataset:
    """A validated COCO ground truth.

    ``boxes[image_id]``: (N, 4) float32 xyxy pixels; ``labels[image_id]``: (N,) int64 category
    ids (COCO ids, not indices); ``ann_ids[image_id]``: (N,) annotation ids; ``iscrowd`` likewise.
    ``xywh[image_id]``: (N, 4) float64, the annotations' ``bbox`` as given: evaluation compares
    these, as pycocotools does (float32 moves an IoU that sits exactly on a threshold).
    """

    images: dict[int, CocoImage]
    categories: dict[int, str]
    boxes: dict[int, NDArray[np.float32]]
    xywh: dict[int, NDArray[np.float64]]
    labels: dict[int, NDArray[np.int64]]
    ann_ids: dict[int, NDArray[np.int64]]
    iscrowd: dict[int, NDArray[np.bool_]]
    areas: dict[int, NDArray[np.float64]]  # the annotation's 'area' if given (COCO uses it), else box area
    raw: dict[str, Any]

    @property
    def num_annotations(self) -> int:
        return int(sum(len(v) for v in self.labels.values()))

    def class_names(self) -> list[str]:
        """Category names in id order."""
        return [self.categories[k] for k in sorted(self.categories)]


def _num(v: object) -> TypeGuard[float]:
    """A finite JSON number (int or float, not bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: cannot read: {exc}") from exc


def parse_coco(data: Any, source: str = "<coco>", require_annotations: bool = False) -> CocoDataset:
    """Validate a parsed COCO detection dict; ``source`` names the file in errors."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: COCO ground truth must be a JSON object")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{source}: missing or non-list {key!r}")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise DataError(f"{source}: 'annotations' must be a list")
    if not data["images"]:
        raise DataError(f"{source}: the dataset has no images")
    if require_annotations and not anns:
        raise DataError(f"{source}: the dataset has no annotations")
    categories: dict[int, str] = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DataError(f"{source}: categories[{i}] needs an integer 'id' and a string 'name'")
        if c["id"] in categories:
            raise DataError(f"{source}: categories[{i}] repeats id {c['id']}")
        categories[c["id"]] = c["name"]
    images: dict[int, CocoImage] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int):
            raise DataError(f"{source}: images[{i}] needs an integer 'id'")
        w, h = im.get("width"), im.get("height")
        if not isinstance(w, int) or not isinstance(h, int) or w <= 0 or h <= 0:
            raise DataError(f"{source}: images[{i}] (id {im['id']}) needs positive integer width and height")
        if im["id"] in images:
            raise DataError(f"{source}: images[{i}] repeats image id {im['id']}")
        extra = {k: v for k, v in im.items() if k not in ("id", "file_name", "width", "height")}
        images[im["id"]] = CocoImage(im["id"], str(im.get("file_name", "")), w, h, extra)
    per_img: dict[int, list[tuple[list[float], int, int, bool, float]]] = {k: [] for k in images}
    seen_ids: set[int] = set()
    for i, a in enumerate(anns):
        where = f"{source}: annotations[{i}]"
        if not isinstance(a, dict):
            raise DataError(f"{where} is not an object")
        if "id" in a:
            if not isinstance(a["id"], int) or a["id"] in seen_ids:
                raise DataError(f"{where} has a missing, non-integer or repeated 'id' ({a.get('id')!r})")
            seen_ids.add(a["id"])
        where = f"{where} (id {a.get('id', '?')})"
        if a.get("image_id") not in images:
            raise DataError(f"{where} refers to unknown image_id {a.get('image_id')!r}")
        if a.get("category_id") not in categories:
            raise DataError(f"{where} has unknown category_id {a.get('category_id')!r}")
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_num(v) for v in bbox):
            raise DataError(f"{where} needs 'bbox' as 4 finite numbers [x, y, w, h], got {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DataError(f"{where} has a negative bbox width/height {bbox!r}")
        given_area = a.get("area")
        area = float(given_area) if _num(given_area) else float(bbox[2]) * float(bbox[3])
        per_img[a["image_id"]].append((bbox, a["category_id"], a.get("id", -1), bool(a.get("iscrowd", 0)), area))
    boxes, xywh, labels, ids, crowd, areas = {}, {}, {}, {}, {}, {}
    for k, rows in per_img.items():
        xywh[k] = np.array([r[0] for r in rows], np.float64).reshape(-1, 4)
        boxes[k] = bbox_corners(xywh[k])[0].astype(np.float32)
        labels[k] = np.array([r[1] for r in rows], np.int64)
        ids[k] = np.array([r[2] for r in rows], np.int64)
        crowd[k] = np.array([r[3] for r in rows], bool)
        areas[k] = np.array([r[4] for r in rows], np.float64)
    return CocoDataset(images, categories, boxes, xywh, labels, ids, crowd, areas, data)


def bbox_corners(xywh: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """xyxy corners and w * h areas of (N, 4) COCO [x, y, w, h] boxes, in float64 as pycocotools
    computes them (the area is not the corners' ((x + w) - x) * ((y + h) - y): see kpi.iou_matrix)."""
    b = np.asarray(xywh, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1), b[:, 2] * b[:, 3]


def load_coco(path: str | os.PathLike[str], require_annotations: bool = False) -> CocoDataset:
    """Read and validate a COCO ground-truth file."""
    return parse_coco(read_json(path), str(path), require_annotations)


def parse_results(data: Any, gt: CocoDataset | None = None, source: str = "<results>") -> list[dict[str, Any]]:
    """Validate COCO results (a list of {image_id, category_id, bbox [x,y,w,h], score})."""
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]  # tolerate a results file wrapped like a GT file
    if not isinstance(data, list):
        raise DataError(f"{source}: COCO results must be a JSON list of detections")
    out = []
    for i, r in enumerate(data):
        where = f"{source}: [{i}]"
        if not isinstance(r, dict):
            raise DataError(f"{where} is not an object")
        bbox, score = r.get("bbox"), r.get("score")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_num(v) for v in bbox):
            raise DataError(f"{where} needs 'bbox' as 4 finite numbers, got {bbox!r}")
        if not _num(score):
            raise DataError(f"{where} needs a finite numeric 'score', got {score!r}")
        if not isinstance(r.get("image_id"), int) or not isinstance(r.get("category_id"), int):
            raise DataError(f"{where} needs integer 'image_id' and 'category_id'")
        if gt is not None:
            if r["image_id"] not in gt.images:
                raise DataError(f"{where} refers to image_id {r['image_id']} not in the ground truth")
            if r["category_id"] not in gt.categories:
                raise DataError(f"{where} has category_id {r['category_id']} not in the ground truth")
        out.append(r)
    return out


def load_results(path: str | os.PathLike[str], gt: CocoDataset | None = None) -> list[dict[str, Any]]:
    return parse_results(read_json(path), gt, str(path))


def category_ids(gt: dict[str, Any] | CocoDataset) -> list[int]:
    """COCO category ids in id order: the model's class index i is ``category_ids(gt)[i]``."""
    if isinstance(gt, CocoDataset):
        return sorted(gt.categories)
    return sorted(int(c["id"]) for c in gt.get("categories", []))


def detections_to_results(
    boxes: NDArray[np.floating], scores: NDArray[np.floating], class_ids: NDArray[np.integer], image_id: int,
    categories: list[int],
) -> list[dict[str, Any]]:
    """COCO result records (xywh boxes in source pixels) of one image's detections.

    boxes: (N, 4) xyxy; class_ids: model class indices, mapped through ``categories``.
    """
    out = []
    for (x1, y1, x2, y2), score, cls in zip(
        np.asarray(boxes, np.float64).tolist(), np.asarray(scores).tolist(), np.asarray(class_ids).tolist(), strict=True
    ):
        out.append({"image_id": int(image_id), "category_id": int(categories[int(cls)]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return out
