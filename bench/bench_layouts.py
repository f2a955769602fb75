"""Decode cost per frame of every output layout, side by side in one run.

Each layout's decoder + NMS + mapping back to source pixels (``perception.postprocess``) runs on
one frame's outputs of the size its family really produces, seeded so that a realistic number
of candidates pass the score threshold (a few hundred of thousands of anchors, clustered around
~30 objects). Reported: median and p95 ms per frame, and the ratio to today's ``yolo_obj``.

    python -m bench.bench_layouts [--runs 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np

from perception.layouts import DECODERS, DecodeContext
from perception.letterbox import compute_letterbox
from perception.options import PostprocessOptions
from perception.postprocess import postprocess

C = 7  # this project's classes; the families' COCO exports have 80, which the --classes flag sets


def _objects(rng: np.random.Generator, n_obj: int, w: int, h: int) -> np.ndarray:
    cx, cy = rng.uniform(0, w, n_obj), rng.uniform(0, h, n_obj)
    bw, bh = rng.uniform(10, w / 4, n_obj), rng.uniform(10, h / 4, n_obj)
    return np.stack([cx, cy, bw, bh], 1).astype(np.float32)


def _anchors(rng: np.random.Generator, n: int, objs: np.ndarray, hit: float) -> tuple[np.ndarray, np.ndarray]:
    """cx cy w h per anchor (jittered copies of objects for a share ``hit``, noise elsewhere) and
    the object index per anchor (-1 for background)."""
    owner = np.where(rng.random(n) < hit, rng.integers(0, len(objs), n), -1)
    boxes = np.abs(rng.normal(50, 30, (n, 4))).astype(np.float32)
    sel = owner >= 0
    boxes[sel] = objs[owner[sel]] * rng.normal(1.0, 0.03, (int(sel.sum()), 4)).astype(np.float32)
    return boxes, owner


def make_outputs(layout: str, classes: int, rng: np.random.Generator) -> tuple[dict[str, Any], int, int]:
    """One frame's outputs (batch axis off) by role, and the model input size."""
    w, h = (512, 288) if layout == "yolo_obj" else (640, 640)
    objs = _objects(rng, 30, w, h)
    obj_cls = rng.integers(0, classes, len(objs))
    if layout in ("yolo_obj", "yolov5", "yolov8"):
        n = {"yolo_obj": 3024, "yolov5": 25200, "yolov8": 8400}[layout]
        boxes, owner = _anchors(rng, n, objs, 0.02)
        cls = rng.uniform(0, 0.05, (n, classes)).astype(np.float32)
        sel = owner >= 0
        cls[sel, obj_cls[owner[sel]]] = rng.uniform(0.3, 0.95, int(sel.sum()))
        if layout == "yolov8":
            return {"predictions": np.concatenate([boxes, cls], 1).T.copy()}, w, h
        obj = np.where(sel, rng.uniform(0.5, 1.0, n), rng.uniform(0, 0.05, n)).astype(np.float32)[:, None]
        if layout == "yolo_obj":
            b = boxes.copy()
            b[:, :2], b[:, 2:] = boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2
            boxes = b
        return {"predictions": np.concatenate([boxes, obj, cls], 1)}, w, h
    if layout == "ssd":
        n = 3000
        boxes, owner = _anchors(rng, n, objs, 0.03)
        corners = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
        corners /= np.array([w, h, w, h], np.float32)
        scores = rng.dirichlet(np.ones(classes + 1) * 0.3, n).astype(np.float32) * 0.2
        scores[:, 0] += 0.8
        sel = owner >= 0
        scores[sel, 0] = 0.1
        scores[sel, 1 + obj_cls[owner[sel]]] = rng.uniform(0.3, 0.9, int(sel.sum()))
        return {"boxes": corners, "scores": scores}, w, h
    k = 100
    b = objs[:k]
    corners = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1).astype(np.float32)
    pad = np.zeros((k - len(corners), 4), np.float32)
    return {"num_dets": np.array([len(objs)], np.int64), "boxes": np.concatenate([corners, pad]),
            "scores": np.concatenate([rng.uniform(0.3, 0.95, len(objs)), np.zeros(k - len(objs))]).astype(np.float32),
            "classes": np.concatenate([obj_cls, np.zeros(k - len(objs), np.int64)])}, w, h


def bench(runs: int, classes: int, seed: int = 0) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    cases = {name: make_outputs(name, classes, rng) for name in DECODERS}
    opts = PostprocessOptions(score_threshold=0.25, iou_threshold=0.5, max_detections=100, pre_nms_topk=1000)
    times: dict[str, list[float]] = {name: [] for name in cases}
    counts: dict[str, int] = {}
    for _ in range(runs):  # round-robin: machine noise hits every layout alike
        for name, (outs, w, h) in cases.items():
            lb = compute_letterbox(1920, 1080, w, h)
            ctx = DecodeContext(w, h)
            t0 = time.perf_counter()
            det = postprocess(outs, lb, opts, DECODERS[name], classes, ctx)
            times[name].append((time.perf_counter() - t0) * 1e3)
            counts[name] = len(det)
    base = statistics.median(times["yolo_obj"])
    return {name: {"p50_ms": statistics.median(t), "p95_ms": float(np.percentile(t, 95)),
                   "vs_yolo_obj": statistics.median(t) / base, "detections": float(counts[name]),
                   "outputs": float(sum(np.asarray(v).size for v in cases[name][0].values()))}
            for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--classes", type=int, default=C)
    a = p.parse_args(argv)
    rows = bench(a.runs, a.classes)
    print(f"decode + NMS + letterbox inverse per frame ({a.runs} runs, {a.classes} classes, 1920x1080 source)")
    print(f"{'layout':<16}{'outputs':>10}{'p50 ms':>9}{'p95 ms':>9}{'vs yolo_obj':>13}{'dets':>6}")
    for name, r in rows.items():
        print(f"{name:<16}{int(r['outputs']):>10}{r['p50_ms']:>9.3f}{r['p95_ms']:>9.3f}{r['vs_yolo_obj']:>12.2f}x"
              f"{int(r['detections']):>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
