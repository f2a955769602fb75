"""Matching replayed frames and classes to a COCO ground truth.

A frame read from a file is found by that file's name first (the image folder's relative path,
or a bare name under its camera's folder): a folder with frames removed numbers the rest from 0,
so their positions name other images. Then by the ``camera_id`` + ``sequence`` fields (the
bundled drive's gt.json has them), then by a bare file name only one image has, then by
"<camera_id>/<sequence:06d>.jpg". A class is found by name, else treated as absent from the
ground truth.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.frames import FrameResult, FrameStatus
from perception.boxes import xyxy_to_xywh
from perception.coco import CocoDataset, load_coco


@dataclass
class GroundTruthIndex:
    dataset: CocoDataset
    by_key: dict[tuple[str, int], int]
    by_file: dict[str, int]  # the images' file names, exactly
    by_base: dict[str, int]  # a bare file name (no folder) only one image has
    category_by_name: dict[str, int]
    path: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GroundTruthIndex:
        ds = load_coco(path)
        return cls.from_dataset(ds, Path(path))

    @classmethod
    def from_dataset(cls, ds: CocoDataset, path: Path | None = None) -> GroundTruthIndex:
        by_key: dict[tuple[str, int], int] = {}
        by_file: dict[str, int] = {}
        bases: dict[str, set[int]] = {}
        for img in ds.images.values():
            cam, seq = img.extra.get("camera_id"), img.extra.get("sequence")
            if isinstance(cam, str) and isinstance(seq, int):
                by_key[(cam, seq)] = img.id
            if img.file_name:
                by_file[img.file_name] = img.id
                bases.setdefault(Path(img.file_name).name, set()).add(img.id)
        # A bare file name finds its image only if one image has it: "000000.jpg" of a rear/
        # folder replayed alone must not take front/000000.jpg (the first one used to win).
        by_base = {base: next(iter(ids)) for base, ids in bases.items() if len(ids) == 1}
        cats = {name: cid for cid, name in ds.categories.items()}
        return cls(ds, by_key, by_file, by_base, cats, path)

    def image_id(self, camera_id: str, sequence: int, file_name: str = "") -> int | None:
        """The ground-truth image of a frame (see the module docstring), or None."""
        hit = None
        if file_name:
            hit = self.by_file.get(file_name)
            if hit is None and "/" not in file_name:  # a bare name in a folder named after its camera
                hit = self.by_file.get(f"{camera_id}/{file_name}")
        if hit is None:
            hit = self.by_key.get((camera_id, sequence))
        if hit is None and file_name and "/" not in file_name:
            hit = self.by_base.get(file_name)
        if hit is None:
            hit = self.by_file.get(f"{camera_id}/{sequence:06d}.jpg")
        return hit

    def category_id(self, class_name: str) -> int | None:
        return self.category_by_name.get(class_name)


def coco_predictions(
    results: list[FrameResult], gt: GroundTruthIndex | None = None, file_names: dict[tuple[str, int], str] | None = None
) -> tuple[list[dict[str, Any]], int]:
    """COCO results ({image_id, category_id, bbox [x, y, w, h], score}) of the OK frames, and
    how many answered frames found no ground-truth image.

    With ``gt`` ids come from it (frames and classes it does not know are left out). Without,
    image ids number frames in (camera, sequence) order from 1 and category ids are class ids;
    each record also carries camera_id, sequence and file_name so it can be re-mapped later.
    """
    file_names = file_names or {}
    ordered = sorted((r for r in results if r.status is FrameStatus.OK), key=lambda r: (r.camera_id, r.sequence))
    out: list[dict[str, Any]] = []
    unmatched = 0
    for n, r in enumerate(ordered, 1):
        key = (r.camera_id, r.sequence)
        # The frame's own file, if it came from one (a name made up here would outrank its position).
        own = file_names.get(key) or str(r.extra.get("file_name", ""))
        fname = own or f"{r.camera_id}/{r.sequence:06d}.jpg"
        if gt is not None:
            image_id = gt.image_id(r.camera_id, r.sequence, own)
            if image_id is None:
                unmatched += 1
                continue
        else:
            image_id = n
        xywh = xyxy_to_xywh(r.detections.boxes)  # (0, 4) when the frame has no detections
        for box, score, cid, name in zip(
            xywh, r.detections.scores, r.detections.class_ids, r.class_names, strict=True
        ):
            cat = gt.category_id(name) if gt is not None else int(cid)
            if cat is None:
                continue
            rec: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": int(cat),
                "bbox": [round(float(v), 2) for v in box],
                "score": round(float(score), 5),
            }
            if gt is None:
                rec.update(camera_id=r.camera_id, sequence=r.sequence, file_name=fname)
            out.append(rec)
    return out, unmatched
