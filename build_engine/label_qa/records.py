"""A lenient view of a dataset's labels for linting: every box as a record with where it came
from (``annotations[17]``, ``labels/000003.txt:4``), keeping what a strict reader would refuse
(unknown class ids, boxes outside the image, zero area, NaN / inf coordinates) so the linter
can report it.

Files that cannot be parsed at all (broken JSON, a YOLO line without 5 fields, a label file
that is not text, an image record without a positive size to measure boxes against) are still a
one-line ``DataError`` naming the file and record: there is no record to report. What training
refuses of a set that parses (a repeated COCO image id, a YOLO label file without an image, two
YOLO images reading one label file) is kept here for the linter to report.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from build_engine.data.formats import IMAGE_EXTS, image_size, parse_yolo_line, read_classes, read_label_text
from perception.coco import read_json
from perception.errors import DataError


@dataclass(frozen=True)
class LabelRecord:
    """One label. box: x1 y1 x2 y2 pixels as written; class_id: index (may be out of range)."""

    image_id: int
    image: str  # file name relative to the dataset root
    width: int
    height: int
    box: tuple[float, float, float, float]
    class_id: int
    ref: str  # where the record lives
    crowd: bool = False  # a COCO crowd region (iscrowd 1): many objects, an ignore region in training


@dataclass(frozen=True)
class LabelSet:
    root: Path
    classes: tuple[str, ...]
    images: dict[int, tuple[str, int, int]]  # image_id -> (relative file, width, height)
    records: list[LabelRecord]
    source: str  # "coco" or "yolo"
    # YOLO images whose label file another image of the same name reads too (a.jpg and a.png:
    # labels/a.txt): (the image, the other image, the label file), which training refuses.
    shared_label_files: tuple[tuple[str, str, str], ...] = ()
    # YOLO label files no image reads (labels/b.txt without images/b.*), relative to the root,
    # which training refuses.
    orphan_label_files: tuple[str, ...] = ()
    # COCO image records whose id an earlier one has, which training refuses: (the id, the
    # record "images[3]", its file, width, height, the earlier record "images[1]"). ``images``
    # keeps the earlier one, so the id's annotations are checked against one image, not a blend.
    repeated_image_ids: tuple[tuple[int, str, str, int, int, str], ...] = ()


def _coco(root: Path) -> LabelSet:
    path = root / "annotations.json"
    data = read_json(path)
    if (not isinstance(data, dict) or not isinstance(data.get("images"), list)
            or not isinstance(data.get("categories"), list)):
        raise DataError(f"{path}: not a COCO detection file (needs 'images' and 'categories' lists)")
    try:
        cat_ids = sorted(int(c["id"]) for c in data["categories"])
        names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    except (KeyError, TypeError, ValueError) as exc:  # it printed "error: 'id'"
        bad = next((i for i, c in enumerate(data["categories"])
                    if not (isinstance(c, dict) and "id" in c and "name" in c)), 0)
        raise DataError(f"{path}: categories[{bad}] needs an integer id and a name") from exc
    index = {cid: i for i, cid in enumerate(cat_ids)}
    anns = data.get("annotations", [])
    if not isinstance(anns, list):  # null iterated as "'NoneType' object is not iterable"
        got = "null" if anns is None else type(anns).__name__
        raise DataError(f"{path}: 'annotations' must be a list, got {got}")
    images: dict[int, tuple[str, int, int]] = {}
    first: dict[int, int] = {}
    repeated: list[tuple[int, str, str, int, int, str]] = []
    for i, im in enumerate(data["images"]):
        try:
            name = str(im["file_name"])
            # In images/ (this project's layout) or beside the JSON, as the other readers take it.
            rel = name if not (root / "images" / name).is_file() and (root / name).is_file() else "images/" + name
            iid, w, h = int(im["id"]), im["width"], im["height"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: images[{i}] needs id, file_name, width and height") from exc
        # Boxes are judged against the size (a width of 0 divided by zero), as training refuses it.
        if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in (w, h)):
            raise DataError(f"{path}: images[{i}] (id {iid}, {name}) needs a positive integer width and height, "
                            f"got {w!r} x {h!r}")
        if iid in first:
            repeated.append((iid, f"images[{i}]", rel, w, h, f"images[{first[iid]}]"))
            continue
        first[iid] = i
        images[iid] = (rel, w, h)
    records = []
    for i, a in enumerate(anns):
        ref = f"annotations[{i}] (id {a.get('id', '?')})" if isinstance(a, dict) else f"annotations[{i}]"
        bbox = a.get("bbox") if isinstance(a, dict) else None
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise DataError(f"{path}: {ref} needs 'bbox' as 4 numbers, got {bbox!r}")
        iid = a.get("image_id")
        if iid not in images:
            raise DataError(f"{path}: {ref} refers to unknown image_id {iid!r}")
        f, w, h = images[iid]
        cid = a.get("category_id")
        cls = index.get(cid, -1) if isinstance(cid, int) else -1
        if cls < 0:
            cls = 10_000 + (cid if isinstance(cid, int) else 0)  # reported as unknown
        x, y, bw, bh = (float(v) for v in bbox)
        records.append(LabelRecord(iid, f, w, h, (x, y, x + bw, y + bh), cls, ref, bool(a.get("iscrowd", 0))))
    return LabelSet(root, tuple(names[c] for c in cat_ids), images, records, "coco",
                    repeated_image_ids=tuple(repeated))


def _yolo(root: Path) -> LabelSet:
    classes = read_classes(root / "classes.txt")
    image_dir = root / "images"
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS) if image_dir.is_dir() else []
    if not files:
        raise DataError(f"{root / 'images'}: no images")
    images, records = {}, []
    first_of: dict[str, Path] = {}
    shared: list[tuple[str, str, str]] = []
    for iid, f in enumerate(files, start=1):
        w, h = image_size(f)
        images[iid] = (f"images/{f.name}", w, h)
        lf = root / "labels" / f"{f.stem}.txt"
        other = first_of.setdefault(f.stem, f)
        if other is not f:
            shared.append((f"images/{f.name}", f"images/{other.name}", f"labels/{lf.name}"))
        if not lf.is_file():
            continue
        for ln, line in enumerate(read_label_text(lf).splitlines(), start=1):
            if not line.strip():
                continue
            c, cx, cy, bw, bh = parse_yolo_line(line, lf, ln)
            box = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
            records.append(LabelRecord(iid, f"images/{f.name}", w, h, box, c, f"labels/{lf.name}:{ln}"))
    # As read_yolo_set finds them: a label file whose stem no image has.
    label_files = (root / "labels").glob("*.txt") if (root / "labels").is_dir() else ()
    orphans = sorted(f"labels/{p.name}" for p in label_files if p.stem not in first_of)
    return LabelSet(root, classes, images, records, "yolo", tuple(shared), tuple(orphans))


def read_label_set(root: str | os.PathLike[str]) -> LabelSet:
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"{r}: no such dataset directory")
    ls = _coco(r) if (r / "annotations.json").is_file() else _yolo(r)
    if not ls.images:
        raise DataError(f"{r}: the dataset has no images")
    return ls


def boxes_of(ls: LabelSet, image_id: int) -> tuple[np.ndarray, np.ndarray, list[LabelRecord]]:
    """Valid records (known class, finite coordinates, positive size) of one image: (N, 4) boxes,
    (N,) classes, records. The others are reported by the geometric checks, not judged here."""
    recs = [r for r in ls.records if r.image_id == image_id and 0 <= r.class_id < len(ls.classes)
            and all(math.isfinite(v) for v in r.box) and r.box[2] > r.box[0] and r.box[3] > r.box[1]]
    boxes = np.array([r.box for r in recs], np.float32).reshape(-1, 4)
    return boxes, np.array([r.class_id for r in recs], np.int64), recs
