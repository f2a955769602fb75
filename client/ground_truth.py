"""Matching replayed frames and classes to a COCO ground truth.

A frame read from a file (an image folder's: it has a ``file_name``) is found by that file's
name first (the image folder's relative path, or a bare name under its camera's folder): a
folder with frames removed numbers the rest from 0, so their positions name other images. Then
by the ``camera_id`` + ``sequence`` fields (the bundled drive's gt.json has them), then by a bare
file name only one image has. A frame with no file of its own (a video's, an MCAP's, a bag's)
is found by ``camera_id`` + ``sequence``. Last, for a camera the ground truth has no
``camera_id`` + ``sequence`` for (frames extracted with that naming), by
"<camera_id>/<sequence:06d>.jpg"; never for a camera it has them for: there that name is only
a guess, and ground truth whose files are numbered from 1 names the frame after by it.

Two frames found to be one image is an error (``GroundTruthIndex.match``): the replay or the
ground truth is not what it is taken for, and the image would be scored twice.

A class is found by its name, compared without regard to case, spaces, hyphens and underscores
("Traffic Light" is "traffic_light"). When no detection's class name is a category's at all (a
model whose names are not the ground truth's, or records without names), classes are found by
class id through the categories in id order, as the build maps a model's classes
(``perception.coco.category_ids``), with a warning. Detections of a class found neither way are
left out of the scores and counted.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.frames import FrameResult, FrameStatus
from perception.boxes import xyxy_to_xywh
from perception.coco import CocoDataset, category_ids, load_coco
from perception.errors import DataError

log = logging.getLogger(__name__)

FrameKey = tuple[str, int]  # (camera_id, sequence)


def _name_key(name: str) -> str:
    """A class name as compared: lower case, without spaces, hyphens and underscores."""
    return re.sub(r"[\s_\-]+", "", name).casefold()


@dataclass
class GroundTruthIndex:
    dataset: CocoDataset
    by_key: dict[tuple[str, int], int]
    by_file: dict[str, int]  # the images' file names, exactly
    by_base: dict[str, int]  # a bare file name (no folder) only one image has
    category_by_name: dict[str, int]
    path: Path | None = None
    key_cameras: frozenset[str] = frozenset()  # cameras some image has camera_id + sequence for
    category_by_key: dict[str, int] = field(default_factory=dict)  # _name_key(name) -> id, if one category has it
    _told_id_order: bool = field(default=False, repr=False)

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
        keyed: dict[str, set[int]] = {}
        for cid, name in ds.categories.items():
            keyed.setdefault(_name_key(name), set()).add(cid)
        # Two categories that differ only in spelling ("traffic light", "traffic_light") are
        # found by their exact names only.
        by_name_key = {k: next(iter(ids)) for k, ids in keyed.items() if len(ids) == 1}
        key_cameras = frozenset(cam for cam, _ in by_key)
        return cls(ds, by_key, by_file, by_base, cats, path, key_cameras, by_name_key)

    def image_id(self, camera_id: str, sequence: int, file_name: str = "") -> int | None:
        """The ground-truth image of a frame (see the module docstring), or None.
        ``file_name``: the frame's own file, "" if it has none."""
        hit = None
        if file_name:
            hit = self.by_file.get(file_name)
            if hit is None and "/" not in file_name:  # a bare name in a folder named after its camera
                hit = self.by_file.get(f"{camera_id}/{file_name}")
        if hit is None:
            hit = self.by_key.get((camera_id, sequence))
        if hit is None and file_name and "/" not in file_name:
            hit = self.by_base.get(file_name)
        if hit is None and camera_id not in self.key_cameras:
            hit = self.by_file.get(f"{camera_id}/{sequence:06d}.jpg")
        return hit

    def match(self, frames: Iterable[tuple[str, int, str]]) -> dict[FrameKey, int]:
        """(camera_id, sequence) -> ground-truth image id of each frame (camera_id, sequence,
        file_name) found. DataError for a frame given twice, or two frames found to be one image."""
        out: dict[FrameKey, int] = {}
        taken: dict[int, tuple[FrameKey, str]] = {}
        for cam, seq, fname in frames:
            key = (cam, seq)
            if key in out:
                raise DataError(f"frame {cam}/{seq} is given twice")
            iid = self.image_id(cam, seq, fname)
            if iid is None:
                continue
            other = taken.get(iid)
            if other is not None:
                image = self.dataset.images[iid]
                raise DataError(
                    f"{self.path or 'ground truth'}: frames {_frame_name(*other[0], other[1])} and "
                    f"{_frame_name(cam, seq, fname)} both match ground-truth image {iid} ({image.file_name}): "
                    "the ground truth's file names or camera_id + sequence do not name the frames replayed")
            taken[iid] = (key, fname)
            out[key] = iid
        return out

    def category_id(self, class_name: str) -> int | None:
        """The category named ``class_name`` (exactly, else ignoring case, spaces, hyphens and
        underscores), or None."""
        hit = self.category_by_name.get(class_name)
        if hit is None and class_name:
            hit = self.category_by_key.get(_name_key(class_name))
        return hit

    def categories_for(self, class_names: Iterable[str], model_classes: Sequence[str] = ()) -> CategoryMap:
        """How detections whose classes are named ``class_names`` find their categories (see the
        module docstring): by name if any of the names is a category's, else by class id.
        ``model_classes``, the served model's class list when known, counts as named too: a
        model of car and truck that detected only trucks on a ground truth of cars and
        pedestrians has its trucks left out, not scored as pedestrians by their class id."""
        names = {n for n in (*class_names, *model_classes) if n}
        # (No names at all: every detection goes by its class id all the same, see CategoryMap.)
        by_name = not names or any(self.category_id(n) is not None for n in names)
        if not by_name and not self._told_id_order:
            self._told_id_order = True  # once per ground truth: the KPI and the tracking scores both ask
            log.warning("no detected class (%s) is a category of %s (%s): classes are matched by class id, in "
                        "category id order", ", ".join(sorted(names)[:5]), self.path or "the ground truth",
                        ", ".join(sorted(self.category_by_name)[:5]))
        return CategoryMap(self, by_name, category_ids(self.dataset))


@dataclass(frozen=True)
class CategoryMap:
    """Detections' classes -> ground-truth category ids: by name (``by_name``), else by class
    index through the categories in id order (``by_index``)."""

    gt: GroundTruthIndex
    by_name: bool
    by_index: list[int]

    def __call__(self, class_name: str, class_id: int) -> int | None:
        """The category of a detection, or None if the ground truth has no such class. A
        detection without a name is found by its class id even when the others go by name."""
        if self.by_name and class_name:
            return self.gt.category_id(class_name)
        return self.by_index[class_id] if 0 <= class_id < len(self.by_index) else None

    @property
    def rule(self) -> str:
        """How classes were matched, for reports: "name", or "class id" when detections had
        names and none was a category's."""
        return "name" if self.by_name else "class id"


def _frame_name(camera_id: str, sequence: int, file_name: str) -> str:
    return f"{camera_id}/{sequence}" + (f" ({file_name})" if file_name else "")


def frame_file_name(result: FrameResult, file_names: dict[FrameKey, str] | None = None) -> str:
    """The file an answered frame was read from ("" if none): from the replay's ``file_names``,
    else its record's ``file_name``."""
    own = (file_names or {}).get((result.camera_id, result.sequence))
    return own or str(result.extra.get("file_name", ""))


@dataclass(frozen=True)
class Predictions:
    """COCO results of a replay's OK frames, and what was left out of them.

    frames_without_gt: frames the ground truth has no image for.
    unknown_class_detections: detections of frames it has, of a class it has no category for.
    classes_matched_by: "name" or "class id" (see the module docstring); "" without ground truth.
    image_ids: (camera_id, sequence) -> the image id of each frame found.
    """

    records: list[dict[str, Any]]
    frames_without_gt: int = 0
    unknown_class_detections: int = 0
    classes_matched_by: str = ""
    image_ids: dict[FrameKey, int] = field(default_factory=dict)


def coco_predictions(
    results: list[FrameResult], gt: GroundTruthIndex | None = None, file_names: dict[FrameKey, str] | None = None,
    model_classes: Sequence[str] = (),
) -> Predictions:
    """COCO results ({image_id, category_id, bbox [x, y, w, h], score}) of the OK frames.

    With ``gt`` ids come from it (frames and classes it does not know are left out and counted;
    DataError for two frames found to be one image). Without, image ids number frames in
    (camera, sequence) order from 1 and category ids are class ids; each record also carries
    camera_id, sequence and file_name (the frame's file; "" for a frame of a video, an MCAP or a
    bag, which has none) so it can be re-mapped later.
    """
    ordered = sorted((r for r in results if r.status is FrameStatus.OK), key=lambda r: (r.camera_id, r.sequence))
    image_ids: dict[FrameKey, int] = {}
    cats: CategoryMap | None = None
    if gt is not None:
        image_ids = gt.match((r.camera_id, r.sequence, frame_file_name(r, file_names)) for r in ordered)
        cats = gt.categories_for((n for r in ordered if (r.camera_id, r.sequence) in image_ids for n in r.class_names),
                                 model_classes)
    out: list[dict[str, Any]] = []
    unmatched = unknown = 0
    for n, r in enumerate(ordered, 1):
        if cats is not None:
            image_id = image_ids.get((r.camera_id, r.sequence))
            if image_id is None:
                unmatched += 1
                continue
        else:
            image_id = n
        fname = frame_file_name(r, file_names)
        xywh = xyxy_to_xywh(r.detections.boxes)  # (0, 4) when the frame has no detections
        for box, score, cid, name in zip(
            xywh, r.detections.scores, r.detections.class_ids, r.class_names, strict=True
        ):
            cat = cats(name, int(cid)) if cats is not None else int(cid)
            if cat is None:
                unknown += 1
                continue
            rec: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": int(cat),
                "bbox": [round(float(v), 2) for v in box],
                "score": round(float(score), 5),
            }
            if cats is None:
                rec.update(camera_id=r.camera_id, sequence=r.sequence, file_name=fname)
            out.append(rec)
    return Predictions(out, unmatched, unknown, cats.rule if cats is not None else "", image_ids)
