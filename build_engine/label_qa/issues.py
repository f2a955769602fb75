"""Issues and the geometric checks (no model needed).

Every issue has a ``score`` in [0, 1]: how likely it is a real mistake. Geometric defects are
certain (1.0), except implausible sizes, which are scored by how extreme they are.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from build_engine.label_qa.records import LabelRecord, LabelSet
from perception.boxes import box_iou

KINDS = (
    "outside_image", "zero_area", "duplicate", "unknown_class", "tiny_box", "huge_box",  # geometric
    "non_finite", "class_conflict", "shared_label_file", "orphan_label_file", "repeated_image_id",  # geometric
    "bad_box", "missing_label", "wrong_class", "no_object",  # model-assisted
)
# A box may poke out of the image by this much (rounding of the labelling tool).
OUTSIDE_TOLERANCE_PX = 1.0
DUPLICATE_IOU = 0.9
TINY_SIDE_PX = 2.0
HUGE_FRACTION = 0.9


@dataclass(frozen=True)
class Issue:
    image: str
    image_id: int
    box: tuple[float, float, float, float]  # x1 y1 x2 y2 pixels (the label's, or the model's for missing_label)
    kind: str
    score: float
    class_name: str = ""
    ref: str = ""  # the record, e.g. annotations[17] (id 18)
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # JSON has no NaN / inf (json.dumps would write a file strict parsers refuse): null.
        d["box"] = [round(v, 1) if math.isfinite(v) else None for v in self.box]
        d["score"] = round(self.score, 4)
        return d


def _name(ls: LabelSet, c: int) -> str:
    return ls.classes[c] if 0 <= c < len(ls.classes) else f"<unknown {c - 10_000 if c >= 10_000 else c}>"


def _label_issue(r: LabelRecord, class_name: str, kind: str, score: float, detail: str) -> Issue:
    """An issue with the label record ``r`` itself (its own box)."""
    return Issue(r.image, r.image_id, r.box, kind, score, class_name, r.ref, detail)


def find_geometric_issues(ls: LabelSet) -> list[Issue]:
    """Boxes outside the image, zero / negative area, non-finite coordinates (NaN / inf: JSON
    and float() parse them, every comparison with NaN is false, and a training run refuses the
    file), duplicates, one object labelled under two classes (``class_conflict``: a near-
    duplicate box of another class), unknown class ids, implausibly tiny or huge boxes (crowd
    regions aside: one box around a group is no object, and training ignores it), and what
    training refuses of a set that parses: YOLO images that share a label file
    (``shared_label_file``: a.jpg and a.png read labels/a.txt), YOLO label files without an
    image (``orphan_label_file``) and COCO image records repeating an id (``repeated_image_id``).

    A record is reported at most once per kind: of three copies of a box, the second and the
    third are each a ``duplicate`` of the first (the most overlapping earlier box)."""
    out: list[Issue] = []
    for image, other, label_file in ls.shared_label_files:
        iid, (_, image_w, image_h) = next((i, v) for i, v in ls.images.items() if v[0] == image)
        out.append(Issue(image, iid, (0.0, 0.0, float(image_w), float(image_h)), "shared_label_file", 1.0,
                         ref=label_file,
                         detail=f"{other} reads the same label file: training refuses the set; rename one"))
    for label_file in ls.orphan_label_files:
        out.append(Issue("", 0, (0.0, 0.0, 0.0, 0.0), "orphan_label_file", 1.0, ref=label_file,
                         detail="no image in images/ has this name: training refuses the set; add the image "
                                "or remove the file"))
    for iid, ref, image, image_w, image_h, earlier in ls.repeated_image_ids:
        out.append(Issue(image, iid, (0.0, 0.0, float(image_w), float(image_h)), "repeated_image_id", 1.0,
                         ref=ref, detail=f"repeats the id of {earlier}: training refuses the set; give each image "
                                         f"its own id (its annotations are checked against {earlier} here)"))
    by_image: dict[int, list[int]] = {}
    for i, r in enumerate(ls.records):
        x1, y1, x2, y2 = r.box
        name = _name(ls, r.class_id)
        if not 0 <= r.class_id < len(ls.classes):
            out.append(_label_issue(r, name, "unknown_class", 1.0, f"class id not in 0..{len(ls.classes) - 1}"))
            continue
        if not all(math.isfinite(v) for v in r.box):
            out.append(_label_issue(r, name, "non_finite", 1.0, "box coordinates must be finite numbers"))
            continue
        if x2 <= x1 or y2 <= y1:
            out.append(_label_issue(r, name, "zero_area", 1.0, f"width {x2 - x1:.1f}, height {y2 - y1:.1f}"))
            continue
        t = OUTSIDE_TOLERANCE_PX
        if x1 < -t or y1 < -t or x2 > r.width + t or y2 > r.height + t:
            out.append(_label_issue(r, name, "outside_image", 1.0, f"image is {r.width}x{r.height}"))
        w, h = x2 - x1, y2 - y1
        if r.crowd:  # a crowd region may cover most of an image, or a few pixels of a far group
            pass
        elif w < TINY_SIDE_PX or h < TINY_SIDE_PX:
            out.append(_label_issue(r, name, "tiny_box", 0.9, f"{w:.1f}x{h:.1f} px"))
        elif w * h > HUGE_FRACTION * r.width * r.height:
            out.append(_label_issue(r, name, "huge_box", 0.8,
                                    f"covers {w * h / (r.width * r.height):.0%} of the image"))
        by_image.setdefault(r.image_id, []).append(i)
    for idx in by_image.values():
        if len(idx) < 2:
            continue
        boxes = np.array([ls.records[i].box for i in idx], np.float32)
        iou = box_iou(boxes, boxes)
        classes = np.array([ls.records[i].class_id for i in idx])
        for b in range(1, len(idx)):
            rb = ls.records[idx[b]]
            # Each pair once, against the most overlapping earlier box: of three copies, every
            # pair was reported, the third copy twice, and one duplicate too many in the counts.
            for kind, partners in (("duplicate", classes[:b] == classes[b]),
                                   ("class_conflict", classes[:b] != classes[b])):
                overlap = np.where(partners, iou[b, :b], -1.0)
                a = int(overlap.argmax())
                if overlap[a] < DUPLICATE_IOU:
                    continue
                ra = ls.records[idx[a]]
                also = "" if kind == "duplicate" else f" labelled {_name(ls, ra.class_id)}"
                out.append(_label_issue(rb, _name(ls, rb.class_id), kind, float(iou[b, a]),
                                        f"IoU {iou[b, a]:.2f} with {ra.ref}{also}"))
    return out


def rank(issues: list[Issue]) -> list[Issue]:
    """Most likely mistakes first; ties by image and kind for a stable order."""
    return sorted(issues, key=lambda i: (-i.score, i.image, i.kind, i.box))


def format_table(issues: list[Issue], limit: int = 50) -> str:
    lines = [f"{'#':>4} {'score':>6} {'kind':<14} {'class':<14} {'image':<24} {'box':<28} record / detail"]
    for n, i in enumerate(issues[:limit], start=1):
        box = "[" + ", ".join(f"{v:.0f}" for v in i.box) + "]"
        row = f"{n:>4} {i.score:>6.3f} {i.kind:<14} {i.class_name:<14} {i.image:<24} {box:<28} {i.ref} {i.detail}"
        lines.append(row.rstrip())
    if len(issues) > limit:
        lines.append(f"... {len(issues) - limit} more (see --json)")
    counts: dict[str, int] = {}
    for i in issues:
        counts[i.kind] = counts.get(i.kind, 0) + 1
    lines.append("issues: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"))
    return "\n".join(lines)
