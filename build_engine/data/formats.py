"""Label formats users bring their data in: COCO JSON and YOLO txt, read and written.

In memory a dataset is a list of ``Sample``: image file, size, boxes (N, 4) float32 xyxy in
pixels and class indices (N,) int64 into the dataset's class list. A COCO set also keeps each
annotation's ``iscrowd`` and ``area`` (crowd regions are ignore regions: training counts no
prediction on them as background, evaluation ignores detections on them and sizes objects by
``area``, as pycocotools does) and its category ids (results carry the dataset's own ids, which
need not be 1..C).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from numpy.typing import NDArray

from perception.coco import load_coco
from perception.errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
# A YOLO value past this is no fraction of the image: a box may reach a little past its edges
# (some tools write 1.0x), never half an image beyond them.
YOLO_MAX_FRACTION = 1.5


@dataclass(frozen=True)
class Sample:
    """One labelled image. boxes: (N, 4) float32 xyxy pixels; class_ids: (N,) int64 indices.

    iscrowd: (N,) bool, COCO crowd regions (None: none); areas: (N,) float64, the COCO
    annotations' ``area`` (None: the box areas). ``extra``: the image record's other keys.
    """

    image_id: int
    file: Path
    width: int
    height: int
    boxes: NDArray[np.float32]
    class_ids: NDArray[np.int64]
    extra: dict | None = None
    iscrowd: NDArray[np.bool_] | None = None
    areas: NDArray[np.float64] | None = None

    def crowd_mask(self) -> NDArray[np.bool_]:
        """(N,) True for crowd regions (never training targets: ignore regions)."""
        return self.iscrowd if self.iscrowd is not None else np.zeros(len(self.class_ids), bool)


@dataclass(frozen=True)
class LabelledSet:
    """Samples plus the class names their indices refer to; ``root`` is the dataset directory.

    category_ids: the dataset's COCO category id of each class index (empty: 1..C).
    """

    root: Path
    classes: tuple[str, ...]
    samples: list[Sample]
    category_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.category_ids and len(self.category_ids) != len(self.classes):
            raise DataError(f"{self.root}: {len(self.category_ids)} category ids for {len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.samples)

    def coco_category_ids(self) -> tuple[int, ...]:
        """The COCO category id of each class index, as results and ground truth carry them."""
        return self.category_ids or tuple(range(1, len(self.classes) + 1))

    def to_coco(self, samples: list[Sample] | None = None) -> dict:
        """COCO ground truth of ``samples`` (default: all) under this set's category ids."""
        return samples_to_coco(self.samples if samples is None else samples, self.classes, self.root,
                               self.coco_category_ids())


def samples_to_coco(
    samples: list[Sample], classes: tuple[str, ...], root: Path | None = None,
    category_ids: tuple[int, ...] | None = None,
) -> dict:
    """A COCO dict for the samples; file names relative to ``root/images``. category_ids: the
    id of each class index (default 1..C). Crowd flags and given areas are kept."""
    cat_ids = category_ids or tuple(range(1, len(classes) + 1))
    images, anns = [], []
    aid = 1
    for s in samples:
        name = s.file.name if root is None else os.path.relpath(s.file, root / "images")
        im = {"id": s.image_id, "file_name": name, "width": s.width, "height": s.height}
        im.update(s.extra or {})
        images.append(im)
        crowd = s.crowd_mask().tolist()
        for j, (b, c) in enumerate(zip(s.boxes.tolist(), s.class_ids.tolist(), strict=True)):
            w, h = b[2] - b[0], b[3] - b[1]
            area = float(s.areas[j]) if s.areas is not None else round(w * h, 2)
            anns.append({"id": aid, "image_id": s.image_id, "category_id": int(cat_ids[int(c)]),
                         "bbox": [round(v, 2) for v in (b[0], b[1], w, h)], "area": area, "iscrowd": int(crowd[j])})
            aid += 1
    cats = [{"id": cid, "name": n, "supercategory": "road"} for cid, n in zip(cat_ids, classes, strict=True)]
    return {"info": {"description": "perception dataset"}, "images": images, "annotations": anns, "categories": cats}


def write_coco(path: Path, samples: list[Sample], classes: tuple[str, ...], root: Path | None = None) -> Path:
    path.write_text(json.dumps(samples_to_coco(samples, classes, root)))
    return path


def read_coco_set(root: Path, ann_path: Path | None = None) -> LabelledSet:
    """A COCO dataset: ``root/annotations.json`` and images under ``root/images`` (or ``root``)."""
    ann_path = ann_path or root / "annotations.json"
    gt = load_coco(ann_path)
    cat_ids = sorted(gt.categories)
    index = {cid: i for i, cid in enumerate(cat_ids)}
    samples = []
    for iid, im in gt.images.items():
        f = root / "images" / im.file_name
        if not f.is_file():
            f = root / im.file_name
        if not f.is_file():
            raise DataError(f"{ann_path}: image id {iid} names {im.file_name!r}, which does not exist under {root}")
        labels = np.array([index[int(c)] for c in gt.labels[iid]], np.int64)
        samples.append(Sample(iid, f, im.width, im.height, gt.boxes[iid].copy(), labels, dict(im.extra),
                              gt.iscrowd[iid].copy(), gt.areas[iid].copy()))
    return LabelledSet(root, tuple(gt.categories[c] for c in cat_ids), samples, tuple(cat_ids))


def read_classes(path: Path) -> tuple[str, ...]:
    """Class names, one per line, in class-id order; blank lines after the last are ignored.

    DataError naming the file unless it is UTF-8 (a byte-order mark, as some Windows editors
    write, is not part of the first name) and its names are distinct (compared as the val
    data's are, case and outer spaces folded) with none blank before the last: a blank line
    skipped would move every later name one class id down, and two classes of one name cannot
    be told apart."""
    if not path.is_file():
        raise DataError(f"{path}: no such class list (one class name per line)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: the class list is not UTF-8 text ({exc.reason} at byte {exc.start}); save it "
                        "as UTF-8") from exc
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DataError(f"{path}: the class list is empty")
    blank = [n for n, name in enumerate(lines, start=1) if not name]
    if blank:
        raise DataError(f"{path}: line(s) {blank} are blank, before the last class name: skipped, they would move "
                        "every later name one class id down; name the class there or remove the line")
    counts = Counter(name.lower() for name in lines)
    dupes = [name for name in lines if counts[name.lower()] > 1]
    if dupes:
        raise DataError(f"{path}: class names {dupes} are given more than once (case aside): each class needs a "
                        "name of its own")
    return tuple(lines)


def write_yolo(root: Path, samples: list[Sample], classes: tuple[str, ...]) -> None:
    """``root/labels/<stem>.txt`` per image ("class cx cy w h", normalised) + ``root/classes.txt``."""
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for s in samples:
        lines = []
        for b, c in zip(s.boxes.tolist(), s.class_ids.tolist(), strict=True):
            cx, cy = (b[0] + b[2]) / 2 / s.width, (b[1] + b[3]) / 2 / s.height
            w, h = (b[2] - b[0]) / s.width, (b[3] - b[1]) / s.height
            lines.append(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        (root / "labels" / f"{s.file.stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file; DataError naming it if it does not decode."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"{path}: image does not decode")
    return int(img.shape[1]), int(img.shape[0])


def read_label_text(path: Path) -> str:
    """A YOLO label file's text: DataError naming the file unless it is UTF-8 (a byte-order mark,
    as some Windows editors write, is not part of the first line), not a bare codec error."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: the label file is not UTF-8 text ({exc.reason} at byte {exc.start}); YOLO "
                        "labels are text lines 'class cx cy w h'") from exc


def parse_yolo_line(line: str, path: Path, line_no: int) -> tuple[int, float, float, float, float]:
    """One YOLO label line: class id, then centre x, centre y, width, height (fractions of the
    image). A malformed line raises DataError naming the file and line."""
    parts = line.split()
    try:
        if len(parts) != 5:
            raise ValueError(f"expected 5 fields, got {len(parts)}")
        c = int(parts[0])
        cx, cy, bw, bh = (float(v) for v in parts[1:])
    except ValueError as exc:
        raise DataError(f"{path}:{line_no}: malformed YOLO line {line.strip()!r} ({exc})") from exc
    return c, cx, cy, bw, bh


def read_yolo_set(root: Path) -> LabelledSet:
    """A YOLO dataset: ``root/images/*``, ``root/labels/<stem>.txt``, ``root/classes.txt``.

    An image without a label file has no objects; a label file without an image is an error.
    """
    classes = read_classes(root / "classes.txt")
    img_dir, lbl_dir = root / "images", root / "labels"
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: no images directory")
    files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise DataError(f"{img_dir}: no images (looked for {', '.join(IMAGE_EXTS)})")
    stems: dict[str, Path] = {}
    for f in files:
        other = stems.setdefault(f.stem, f)
        if other is not f:  # both would read labels/<stem>.txt: one image's boxes taught for the other
            raise DataError(f"{img_dir}: {other.name} and {f.name} share the label file labels/{f.stem}.txt; "
                            "rename one of them (and its labels)")
    if lbl_dir.is_dir():
        orphans = sorted(p.name for p in lbl_dir.glob("*.txt") if p.stem not in stems)
        if orphans:
            raise DataError(f"{lbl_dir / orphans[0]}: label file has no image ({len(orphans)} such files)")
    samples = []
    for i, f in enumerate(files):
        w, h = image_size(f)
        lf = lbl_dir / f"{f.stem}.txt"
        rows: list[list[float]] = []
        cls: list[int] = []
        if lf.is_file():
            for ln, line in enumerate(read_label_text(lf).splitlines(), start=1):
                if not line.strip():
                    continue
                c, cx, cy, bw, bh = parse_yolo_line(line, lf, ln)
                if not 0 <= c < len(classes):
                    raise DataError(f"{lf}:{ln}: class id {c} out of range 0..{len(classes) - 1}")
                if not all(np.isfinite([cx, cy, bw, bh])) or bw < 0 or bh < 0:
                    raise DataError(f"{lf}:{ln}: box values must be finite with non-negative size")
                if max(abs(cx), abs(cy), bw, bh) > YOLO_MAX_FRACTION:
                    # Pixels taken for fractions made boxes thousands of image widths away: every
                    # one was clipped away in training, which then ran to the end on no objects.
                    raise DataError(f"{lf}:{ln}: YOLO box values are fractions of the image size (0..1), got "
                                    f"{cx:g} {cy:g} {bw:g} {bh:g} for a {w}x{h} image: pixels? Divide x and width by "
                                    "the image width, y and height by its height")
                rows.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
                cls.append(c)
        samples.append(Sample(i + 1, f, w, h, np.array(rows, np.float32).reshape(-1, 4), np.array(cls, np.int64)))
    return LabelledSet(root, classes, samples)


def read_labelled_set(root: str | os.PathLike[str]) -> LabelledSet:
    """COCO if ``root/annotations.json`` exists, else YOLO (``root/labels`` + ``classes.txt``)."""
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"{r}: no such dataset directory")
    if (r / "annotations.json").is_file():
        ds = read_coco_set(r)
    elif (r / "classes.txt").is_file() or (r / "labels").is_dir():
        ds = read_yolo_set(r)
    else:
        raise DataError(f"{r}: neither annotations.json (COCO) nor classes.txt + labels/ (YOLO) found")
    if not ds.samples:
        raise DataError(f"{r}: the dataset is empty")
    return ds


def read_image(path: Path) -> NDArray[np.uint8]:
    """A training image as BGR uint8, at full size (augmentation crops and scales it itself;
    scoring a model reads images through ``perception.pipeline`` instead)."""
    import cv2

    # Stored orientation, as the server decodes frames and as labels' sizes are read: with the
    # EXIF orientation applied, a tagged photo trained rotated pixels against unrotated boxes.
    img = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise DataError(f"{path}: image does not decode")
    # IMREAD_COLOR always decodes to 8-bit BGR; cv2's stubs type every image as the generic MatLike.
    return cast(NDArray[np.uint8], img)
