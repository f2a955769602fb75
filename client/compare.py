"""Per-frame diff of two replays of the same drive (engine A vs engine B).

Detections of a frame are paired greedily by IoU, class-agnostic, best pair first, down to
``pair_iou``. A pair with the same class and IoU >= ``iou`` is unchanged; same class but a
lower IoU has *moved*; a different class at IoU >= ``iou`` has *changed class*; anything
else left over in A has *vanished* and in B has *appeared*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client.frames import FrameResult, FrameStatus
from perception.boxes import box_iou


@dataclass
class FrameDiff:
    camera_id: str
    sequence: int
    unchanged: int = 0
    appeared: list[dict[str, Any]] = field(default_factory=list)
    vanished: list[dict[str, Any]] = field(default_factory=list)
    moved: list[dict[str, Any]] = field(default_factory=list)
    class_changed: list[dict[str, Any]] = field(default_factory=list)
    status: tuple[FrameStatus, FrameStatus] | None = None  # (A, B) when the statuses differ

    @property
    def changes(self) -> int:
        return (
            len(self.appeared) + len(self.vanished) + len(self.moved) + len(self.class_changed)
            + (self.status is not None)
        )

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "camera_id": self.camera_id, "sequence": self.sequence, "unchanged": self.unchanged,
            "appeared": self.appeared, "vanished": self.vanished, "moved": self.moved,
            "class_changed": self.class_changed,
        }
        if self.status is not None:
            d["status"] = {"a": self.status[0].value, "b": self.status[1].value}
        return d


def _det(r: FrameResult, i: int) -> dict[str, Any]:
    return {
        "box": [round(float(v), 2) for v in r.detections.boxes[i]],
        "score": round(float(r.detections.scores[i]), 4),
        "class_id": int(r.detections.class_ids[i]),
        "class_name": r.class_names[i] if i < len(r.class_names) else "",
    }


def diff_frame(a: FrameResult, b: FrameResult, iou: float = 0.5, pair_iou: float = 0.1) -> FrameDiff:
    out = FrameDiff(a.camera_id, a.sequence)
    if a.status is not b.status:
        out.status = (a.status, b.status)
    na, nb = len(a.detections), len(b.detections)
    pairs: list[tuple[int, int, float]] = []
    if na and nb:
        m = box_iou(a.detections.boxes, b.detections.boxes).astype(np.float64)
        # Identical boxes are the same detection even when degenerate (zero area, IoU 0/0).
        same = np.all(np.abs(a.detections.boxes[:, None, :] - b.detections.boxes[None, :, :]) <= 0.01, axis=2)
        m[same] = 1.0
        order = np.argsort(-m, axis=None, kind="stable")
        used_a, used_b = set(), set()
        for flat in order:
            i, j = divmod(int(flat), nb)
            v = float(m[i, j])
            if v < pair_iou:
                break
            if i in used_a or j in used_b:
                continue
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j, v))
    paired_a = {i for i, _, _ in pairs}
    paired_b = {j for _, j, _ in pairs}
    for i, j, v in pairs:
        same = int(a.detections.class_ids[i]) == int(b.detections.class_ids[j])
        if same and v >= iou:
            out.unchanged += 1
        elif same:
            out.moved.append({"a": _det(a, i), "b": _det(b, j), "iou": round(v, 4)})
        elif v >= iou:
            out.class_changed.append({"a": _det(a, i), "b": _det(b, j), "iou": round(v, 4)})
        else:
            paired_a.discard(i)
            paired_b.discard(j)
    out.vanished = [_det(a, i) for i in range(na) if i not in paired_a]
    out.appeared = [_det(b, j) for j in range(nb) if j not in paired_b]
    return out


@dataclass
class CompareReport:
    frames_compared: int
    only_in_a: int
    only_in_b: int
    totals: dict[str, int]
    frames_changed: int
    diffs: list[FrameDiff]
    latency_ms: dict[str, dict[str, float]]

    def as_dict(self, all_frames: bool = False) -> dict[str, Any]:
        return {
            "frames_compared": self.frames_compared,
            "frames_only_in_a": self.only_in_a,
            "frames_only_in_b": self.only_in_b,
            "frames_changed": self.frames_changed,
            "totals": self.totals,
            "latency_ms": self.latency_ms,
            "frames": [d.as_dict() for d in self.diffs if all_frames or d.changes],
        }


def compare_runs(a: list[FrameResult], b: list[FrameResult], iou: float = 0.5, pair_iou: float = 0.1) -> CompareReport:
    """Diff every frame present in both runs (matched by camera_id + sequence)."""
    from client.summary import percentiles

    ia = {(r.camera_id, r.sequence): r for r in a}
    ib = {(r.camera_id, r.sequence): r for r in b}
    common = sorted(set(ia) & set(ib))
    diffs = [diff_frame(ia[k], ib[k], iou, pair_iou) for k in common]
    totals = {
        "detections_a": sum(len(ia[k].detections) for k in common),
        "detections_b": sum(len(ib[k].detections) for k in common),
        "unchanged": sum(d.unchanged for d in diffs),
        "appeared": sum(len(d.appeared) for d in diffs),
        "vanished": sum(len(d.vanished) for d in diffs),
        "moved": sum(len(d.moved) for d in diffs),
        "class_changed": sum(len(d.class_changed) for d in diffs),
        "status_changed": sum(d.status is not None for d in diffs),
    }
    ok = FrameStatus.OK
    return CompareReport(
        frames_compared=len(common),
        only_in_a=len(set(ia) - set(ib)),
        only_in_b=len(set(ib) - set(ia)),
        totals=totals,
        frames_changed=sum(1 for d in diffs if d.changes),
        diffs=diffs,
        latency_ms={
            "a": percentiles([r.latency_ms for r in a if r.status is ok]),
            "b": percentiles([r.latency_ms for r in b if r.status is ok]),
        },
    )
