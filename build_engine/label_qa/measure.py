"""Measure label QA: inject known mistakes into a copy of a COCO dataset, lint it, and count
how many injected mistakes are flagged (recall) and how many flags are injected mistakes
(precision).

  python -m build_engine.label_qa.measure --data VAL_DIR --checkpoint CKPT --out DIR [--per-kind 10]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from build_engine.label_qa.issues import Issue
from perception.boxes import box_iou
from perception.coco import read_json

GEOMETRIC = ("outside_image", "zero_area", "duplicate", "unknown_class")
MODEL = ("bad_box", "missing_label", "wrong_class", "no_object")
# Only objects the model can be expected to judge get model-kind mistakes.
MIN_SIDE_PX = 16


def inject(
    gt: dict[str, Any], per_kind: int, seed: int, kinds: tuple[str, ...] = GEOMETRIC + MODEL
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A copy of ``gt`` with ``per_kind`` mistakes of each kind, and the list of injections
    ({kind, image_id, box xyxy to look for})."""
    rng = np.random.default_rng(seed)
    gt = copy.deepcopy(gt)
    anns = gt["annotations"]
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    n_cls = len(gt["categories"])
    used: set[int] = set()
    injected: list[dict[str, Any]] = []
    next_id = max(a["id"] for a in anns) + 1

    def pick(min_side: float) -> int:
        cand = [i for i, a in enumerate(anns)
                if i not in used and min(a["bbox"][2], a["bbox"][3]) >= min_side and a["category_id"] <= n_cls]
        i = int(rng.choice(cand))
        used.add(i)
        return i

    def xyxy(b: list[float]) -> list[float]:
        return [b[0], b[1], b[0] + b[2], b[1] + b[3]]

    removed: list[int] = []
    for kind in kinds:
        for _ in range(per_kind):
            orig: list[float] | None = None
            if kind == "unknown_class":
                a = anns[pick(4)]
                orig = xyxy(a["bbox"])
                a["category_id"] = 99
            elif kind == "zero_area":
                a = anns[pick(4)]
                orig = xyxy(a["bbox"])
                a["bbox"][2] = 0.0
            elif kind == "outside_image":
                a = anns[pick(4)]
                orig = xyxy(a["bbox"])
                w, _ = sizes[a["image_id"]]
                a["bbox"][0] = w - a["bbox"][2] / 2  # half of it beyond the right edge
            elif kind == "duplicate":
                a = copy.deepcopy(anns[pick(4)])
                a["id"] = next_id
                next_id += 1
                used.add(len(anns))  # the copy is not a candidate for another mistake
                anns.append(a)
            elif kind == "bad_box":
                a = anns[pick(MIN_SIDE_PX)]
                orig = xyxy(a["bbox"])
                x, y, w, h = a["bbox"]
                if rng.random() < 0.5:  # shifted by 40% of its width
                    a["bbox"] = [x + float(rng.choice([-1, 1])) * 0.4 * w, y, w, h]
                else:  # grown to 1.7x around its centre
                    a["bbox"] = [x - 0.35 * w, y - 0.35 * h, 1.7 * w, 1.7 * h]
            elif kind == "wrong_class":
                a = anns[pick(MIN_SIDE_PX)]
                a["category_id"] = int(rng.choice([c for c in range(1, n_cls + 1) if c != a["category_id"]]))
            elif kind == "missing_label":
                i = pick(MIN_SIDE_PX)
                a = anns[i]
                removed.append(i)
            elif kind == "no_object":
                im = gt["images"][int(rng.integers(len(gt["images"])))]
                w, h = float(rng.uniform(20, 50)), float(rng.uniform(20, 50))
                # In the sky: above the horizon nothing but traffic lights is ever drawn.
                a = {"id": next_id, "image_id": im["id"], "category_id": int(rng.integers(1, n_cls + 1)),
                     "bbox": [float(rng.uniform(0, im["width"] - w)), float(rng.uniform(0, im["height"] * 0.2)), w, h],
                     "area": w * h, "iscrowd": 0}
                next_id += 1
                used.add(len(anns))
                anns.append(a)
            else:
                raise ValueError(kind)
            # A corrupted label also leaves its object unlabelled: a flag at the original box
            # (e.g. missing_label there) is a finding about this mistake too.
            injected.append({"kind": kind, "image_id": a["image_id"], "box": xyxy(a["bbox"]), "ann_id": a["id"],
                             "orig_box": orig})
    gt["annotations"] = [a for i, a in enumerate(anns) if i not in set(removed)]
    return gt, injected


def score_flags(flags: list[Issue], injected: list[dict[str, Any]]) -> dict[str, Any]:
    """Match flags to injections (same image, box IoU >= 0.5 or the same record id)."""
    found_any = [False] * len(injected)
    found_kind = [False] * len(injected)
    real = [False] * len(flags)
    for fi, f in enumerate(flags):
        for ii, inj in enumerate(injected):
            if inj["image_id"] != f.image_id:
                continue
            same_rec = f.ref.endswith(f"(id {inj['ann_id']})") and inj["kind"] != "missing_label"
            iou = float(box_iou(np.array([f.box]), np.array([inj["box"]]))[0, 0]) if inj["kind"] != "zero_area" else 0.0
            if inj.get("orig_box") is not None:
                iou = max(iou, float(box_iou(np.array([f.box]), np.array([inj["orig_box"]]))[0, 0]))
            if same_rec or iou >= 0.5:
                real[fi] = True
                found_any[ii] = True
                found_kind[ii] |= f.kind == inj["kind"]
    per_kind: dict[str, dict[str, float]] = {}
    for kind in sorted({i["kind"] for i in injected}):
        idx = [k for k, i in enumerate(injected) if i["kind"] == kind]
        n_flags = sum(1 for f in flags if f.kind == kind)
        n_real = sum(1 for k, f in enumerate(flags) if f.kind == kind and real[k])
        per_kind[kind] = {"injected": len(idx), "found": sum(found_kind[k] for k in idx),
                          "recall": sum(found_kind[k] for k in idx) / len(idx),
                          "flags": n_flags, "precision": n_real / n_flags if n_flags else 0.0}
    n = len(injected)
    top = flags[:n]
    return {
        "injected": n, "flags": len(flags),
        "recall": sum(found_kind) / n if n else 0.0, "recall_any_kind": sum(found_any) / n if n else 0.0,
        "precision": sum(real) / len(flags) if flags else 0.0,
        "precision_at_n_injected": sum(real[: len(top)]) / len(top) if top else 0.0,
        "per_kind": per_kind,
    }


def measure(
    data: str | os.PathLike[str], checkpoint: str | None, out: str | os.PathLike[str], per_kind: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    from build_engine.lint_cli import run

    src, dst = Path(data), Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    gt = read_json(src / "annotations.json")
    kinds = GEOMETRIC + (MODEL if checkpoint else ())
    bad, injected = inject(gt, per_kind, seed, kinds)
    (dst / "annotations.json").write_text(json.dumps(bad))
    if not (dst / "images").exists():
        (dst / "images").symlink_to((src / "images").resolve())
    clean = run(str(src), checkpoint)
    flags = run(str(dst), checkpoint)
    result = score_flags(flags, injected)
    result["flags_on_clean_data"] = len(clean)
    (dst / "label_qa_measure.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--per-kind", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(json.dumps(measure(a.data, a.checkpoint, a.out, a.per_kind, a.seed), indent=1))


if __name__ == "__main__":
    main()
