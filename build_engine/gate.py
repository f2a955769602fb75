"""The gate: every variant evaluated through the server's own runtime code, then judged.

Each variant runs through ``server.runtime.onnxruntime_backend.OnnxRuntimeBackend`` with
``perception.preprocess.preprocess_batch`` and ``perception.postprocess.postprocess``, the
exact code path of serving, on every image of the val set. Measured per variant:

* KPI (``perception.kpi.evaluate_coco``): mAP50-95 and mAP50 over all detections down to
  ``EVAL_SCORE_FLOOR`` (as COCO does), precision and recall at the deployed threshold;
* latency p50 / p95 of batch-1 inference on this CPU, all variants timed round-robin in one
  loop so machine noise hits them alike (``measure_latency``);
* parity with FP32 at the deployed threshold (``parity``): share of FP32 detections that
  vanish or move (best same-class match below IoU 0.9), share of new ones that appear.

A variant passes if its mAP50-95 is within its gate (in mAP points, 0..100) of FP32.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from build_engine.calibration import read_bgr
from perception.boxes import box_iou
from perception.errors import DataError
from perception.manifest import PostprocessSpec, PreprocessSpec
from perception.postprocess import PostprocessOptions, postprocess
from perception.preprocess import preprocess_batch
from perception.types import Detections

log = logging.getLogger(__name__)

# Detections kept for mAP: COCO evaluates the whole ranking, not only confident boxes.
EVAL_SCORE_FLOOR = 0.001
# A detection "moved" if its best same-class match is below this IoU (the definition).
PARITY_IOU = 0.9
# Below this IoU the best match is no match at all: the detection vanished / appeared.
MATCH_IOU = 0.5


@dataclass(frozen=True)
class ValSet:
    """A COCO val set: the ground-truth dict and (image id, image path) pairs in id order."""

    root: Path
    gt: dict[str, Any]
    images: tuple[tuple[int, Path], ...]

    @classmethod
    def load(cls, root: Path, limit: int | None = None) -> "ValSet":
        """``root/annotations.json`` + ``root/images/<file_name>``; the first ``limit`` images."""
        from perception.coco import load_coco

        ds = load_coco(Path(root) / "annotations.json")
        ids = sorted(ds.images)[:limit] if limit else sorted(ds.images)
        if not ids:
            raise DataError(f"{root}: val set has no images")
        images = []
        for i in ids:
            p = Path(root) / "images" / ds.images[i].file_name
            if not p.is_file():
                p = Path(root) / ds.images[i].file_name
            if not p.is_file():
                raise DataError(f"{root}: image {ds.images[i].file_name!r} (id {i}) is missing")
            images.append((i, p))
        keep = set(ids)
        gt = dict(ds.raw)
        gt["images"] = [im for im in ds.raw["images"] if im["id"] in keep]
        gt["annotations"] = [a for a in ds.raw.get("annotations", []) if a["image_id"] in keep]
        return cls(Path(root), gt, tuple(images))


@dataclass
class VariantEval:
    """What the gate measured for one variant."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    detections: list[Detections] = field(default_factory=list)  # per val image, deployed threshold
    predictions: list[dict[str, Any]] = field(default_factory=list)  # COCO results, score floor


def make_backend(path: Path, threads: int, max_batch: int = 8) -> Any:
    """The server's onnxruntime backend for ``path``, activated."""
    from server.runtime.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(path, intra_op_threads=threads, max_batch=max_batch)
    backend.activate()
    return backend


def evaluate_variant(
    name: str,
    path: Path,
    valset: ValSet,
    pre: PreprocessSpec,
    post: PostprocessSpec,
    threads: int = 2,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    backend: Any = None,
) -> VariantEval:
    """Run ``path`` on every val image through the serving code; KPI + detections.

    backend: an activated ``server.runtime`` backend to use instead of onnxruntime on ``path``
    (e.g. a TensorRT engine); it is deactivated afterwards either way.
    """
    from perception.kpi import evaluate_coco

    backend = backend if backend is not None else make_backend(path, threads, max(batch_size, 1))
    opts = dataclasses.replace(
        PostprocessOptions.from_spec(post), score_threshold=EVAL_SCORE_FLOOR, max_detections=post.max_detections
    )
    cat_ids = sorted(c["id"] for c in valset.gt["categories"])
    ev = VariantEval(name)
    try:
        for start in range(0, len(valset.images), batch_size):
            chunk = valset.images[start : start + batch_size]
            batch, lbs = preprocess_batch([read_bgr(p) for _, p in chunk], pre)
            out = backend.infer(batch)
            for (image_id, _), raw, lb in zip(chunk, out, lbs):
                dets = postprocess(raw, lb, opts)
                for box, score, cls in zip(dets.boxes, dets.scores, dets.class_ids):
                    x1, y1, x2, y2 = (float(v) for v in box)
                    ev.predictions.append(
                        {"image_id": int(image_id), "category_id": int(cat_ids[int(cls)]),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)}
                    )
                ev.detections.append(dets.take(dets.scores >= post.score_threshold))
            if progress is not None:
                progress(min(start + batch_size, len(valset.images)), len(valset.images))
    finally:
        backend.deactivate()
    report = evaluate_coco(valset.gt, ev.predictions, score_threshold=post.score_threshold).to_dict()
    ev.metrics = {k: float(report[k]) for k in ("map50_95", "map50", "precision", "recall")}
    return ev


def measure_latency(
    paths: dict[str, Path],
    sample: np.ndarray | dict[str, np.ndarray],
    runs: int = 30,
    threads: int = 2,
    warmup: int = 3,
    factory: Callable[[str, Path], Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Batch-1 inference latency per variant in ms (p50, p95, mean, min), timed round-robin.

    sample: one (1, 3, H, W) float32 input, or one per variant (by name). factory(name, path)
    returns an activated backend (default: onnxruntime with ``threads``). Interleaving the variants run by run means a
    burst of load from elsewhere on this shared machine slows them all alike, so the
    *ratios* between variants stay meaningful even when absolute numbers drift.
    """
    backends = {n: (factory(n, p) if factory else make_backend(p, threads, 1)) for n, p in paths.items()}
    times: dict[str, list[float]] = {n: [] for n in paths}
    inputs = sample if isinstance(sample, dict) else {n: sample for n in paths}
    try:
        for n, b in backends.items():
            for _ in range(warmup):
                b.infer(inputs[n])
        for _ in range(runs):
            for n, b in backends.items():
                t0 = time.perf_counter()
                b.infer(inputs[n])
                times[n].append((time.perf_counter() - t0) * 1e3)
    finally:
        for b in backends.values():
            b.deactivate()
    return {
        n: {"p50": float(np.percentile(t, 50)), "p95": float(np.percentile(t, 95)), "mean": float(np.mean(t)),
            # The least-disturbed run: on this shared 2-core machine p50 swings with other jobs'
            # load (same model 3.3-7.6 ms in one session), the minimum stays within ~5 %.
            "min": float(np.min(t))}
        for n, t in times.items()
    }


def parity(reference: Sequence[Detections], other: Sequence[Detections], iou: float = PARITY_IOU) -> dict[str, float]:
    """Detection-level agreement of ``other`` with ``reference``, image by image.

    Greedy same-class matching in descending reference score. Returns shares in [0, 1]:
    ``vanished`` (reference detections with no match at IoU >= 0.5), ``moved`` (matched but
    below ``iou``), ``appeared`` (other's detections left unmatched, as a share of other's),
    ``stable`` (matched at >= ``iou``), and the raw counts.
    """
    if len(reference) != len(other):
        raise ValueError(f"parity needs the same images: {len(reference)} vs {len(other)}")
    n_ref = n_oth = vanished = moved = stable = 0
    for ref, oth in zip(reference, other):
        n_ref += len(ref)
        n_oth += len(oth)
        used = np.zeros(len(oth), bool)
        if len(ref) and len(oth):
            ious = box_iou(ref.boxes, oth.boxes)
            # Identical boxes agree even when degenerate (zero area, e.g. clipped at the border).
            ious[np.all(ref.boxes[:, None, :] == oth.boxes[None, :, :], axis=2)] = 1.0
            ious[ref.class_ids[:, None] != oth.class_ids[None, :]] = 0.0
        for i in np.argsort(-ref.scores, kind="stable"):
            if not len(oth):
                vanished += 1
                continue
            cand = np.where(used, -1.0, ious[i])
            j = int(np.argmax(cand))
            if cand[j] < MATCH_IOU:
                vanished += 1
                continue
            used[j] = True
            if cand[j] >= iou:
                stable += 1
            else:
                moved += 1
    appeared = n_oth - stable - moved
    return {
        "vanished": vanished / n_ref if n_ref else 0.0,
        "moved": moved / n_ref if n_ref else 0.0,
        "appeared": appeared / n_oth if n_oth else 0.0,
        "stable": stable / n_ref if n_ref else 1.0,
        "reference_detections": float(n_ref),
        "variant_detections": float(n_oth),
        "iou": iou,
    }


def gate_decision(reference_map: float, variant_map: float, max_drop_points: float) -> dict[str, Any]:
    """``{"passed", "reason", "map50_95_drop_points", "max_drop_points"}``; mAP on 0..1 scale in."""
    drop = (reference_map - variant_map) * 100.0
    passed = drop <= max_drop_points
    verb = "within" if passed else "outside"
    return {
        "passed": bool(passed),
        "reason": f"mAP50-95 drop {drop:+.2f} points vs fp32, {verb} the {max_drop_points:.2f}-point gate",
        "map50_95_drop_points": round(drop, 4),
        "max_drop_points": max_drop_points,
    }


@dataclass
class GateResult:
    """Everything the manifest records about one gated variant."""

    metrics: dict[str, float]
    latency_ms: dict[str, float]
    parity: dict[str, float]
    gate: dict[str, Any]
    detections: list[Detections] = field(default_factory=list, repr=False)


def run_gate(
    variants: dict[str, Path],
    max_drop: dict[str, float | None],
    valset: ValSet,
    pre: PreprocessSpec,
    post: PostprocessSpec,
    runs: int = 30,
    threads: int = 2,
    reference: GateResult | None = None,
    factory: Callable[[str, Path], Any] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, GateResult]:
    """Evaluate, time (round-robin) and judge ``variants`` (name -> model file).

    max_drop[name]: allowed mAP50-95 drop in points vs the reference, None for the reference
    itself (the variant named ``fp32`` unless ``reference`` is given, e.g. when gating
    TensorRT engines against an earlier FP32 result).
    """
    import sys

    from tqdm import tqdm

    evals: dict[str, VariantEval] = {}
    for name, path in variants.items():
        progress(f"gate: evaluating {name} on {len(valset.images)} val images")
        backend = factory(name, path) if factory else None
        with tqdm(total=len(valset.images), desc=f"gate {name}", unit="img", leave=False,
                  disable=not sys.stderr.isatty()) as bar:
            evals[name] = evaluate_variant(name, path, valset, pre, post, threads=threads, backend=backend,
                                           progress=lambda done, _total: bar.update(done - bar.n))
    progress(f"gate: timing {len(variants)} variants round-robin ({runs} runs, batch 1)")
    sample, _ = preprocess_batch([read_bgr(valset.images[0][1])], pre)
    lat = measure_latency(variants, sample, runs, threads, factory=factory)
    ref_metrics = reference.metrics if reference else evals["fp32"].metrics
    ref_dets = reference.detections if reference else evals["fp32"].detections
    out = {}
    for name, ev in evals.items():
        limit = max_drop.get(name)
        if limit is None:
            gate = {"passed": True, "reason": "reference (FP32)"}
        else:
            gate = gate_decision(ref_metrics["map50_95"], ev.metrics["map50_95"], limit)
        out[name] = GateResult(ev.metrics, lat[name], parity(ref_dets, ev.detections), gate, ev.detections)
        progress(f"  {name:<14} mAP50-95 {100 * ev.metrics['map50_95']:6.2f}  p50 {lat[name]['p50']:6.2f} ms  "
                 f"min {lat[name]['min']:6.2f} ms  {'PASS' if gate['passed'] else 'FAIL'}: {gate['reason']}")
    return out
