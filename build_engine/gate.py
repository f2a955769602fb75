"""The gate: every variant evaluated through the one frame pipeline, then judged.

Each val image's encoded bytes go through ``perception.pipeline.FramePipeline`` (the server's
decode -> letterbox -> batch -> infer -> decode outputs -> NMS -> source pixels, including the
reduced-scale JPEG decode of large images) with the model on a ``server.runtime`` backend,
so the KPI is measured on exactly the pixels served. Measured per variant:

* KPI (``perception.kpi.evaluate_coco``): mAP50-95 and mAP50 over all detections down to
  ``EVAL_SCORE_FLOOR`` (as COCO does), precision and recall at the deployed threshold;
* latency p50 / p95 / min of batch-1 inference on the backend alone (no decode), all variants
  timed round-robin in one loop so machine noise hits them alike (``measure_latency``);
* parity with FP32 at the deployed threshold (``perception.parity``): share of FP32
  detections that vanish or move (best same-class match below IoU 0.9), share of new ones.

A variant passes if its mAP50-95 drop vs FP32 and its min-latency ratio to FP32 are within
its ``GateLimits`` (``build_engine.thresholds``), and its p95 within the budget if one is set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from build_engine.thresholds import GateLimits
from perception.coco import category_ids, detections_to_results
from perception.errors import DataError
from perception.manifest import PostprocessSpec, PreprocessSpec
from perception.parity import parity
from perception.pipeline import EVAL_SCORE_FLOOR, FramePipeline, file_frame
from perception.types import Detections
from server.runtime.base import Backend
from server.runtime.factory import RuntimeSettings, open_backend

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

__all__ = ["EVAL_BATCH", "EVAL_SCORE_FLOOR", "GateResult", "ValSet", "evaluate_shown", "evaluate_variant",
           "measure_latency", "parity", "run_gate"]

# Images per inference call when a variant is scored (at most the model's max batch).
EVAL_BATCH = 4


@dataclass(frozen=True)
class ValSet:
    """A COCO val set: the ground-truth dict and (image id, image path) pairs in id order."""

    root: Path
    gt: dict[str, Any]
    images: tuple[tuple[int, Path], ...]

    @classmethod
    def load(cls, root: Path, limit: int | None = None) -> ValSet:
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

    @property
    def paths(self) -> list[Path]:
        return [p for _, p in self.images]

    def class_names(self) -> list[str]:
        return [str(c.get("name", c["id"])) for c in sorted(self.gt["categories"], key=lambda c: c["id"])]


def check_classes(names: Sequence[str], classes: Sequence[str], source: object,
                  reorder: str = "put the data's categories in the model's order") -> None:
    """DataError unless data whose categories are ``names`` (in id order) can score a model of
    ``classes``: the same number, and not the same names in another order (every class id would
    be scored against another class). Other names are only warned about: a dataset may name its
    classes its own way, and is then scored by position. ``source``: what to name in the error
    (the data); ``reorder``: how to fix the order, as the caller's flags say it."""
    if len(names) != len(classes):
        raise DataError(f"{source}: the data has {len(names)} categories {list(names)}, the model {len(classes)} "
                        f"{list(classes)}")
    folded = [n.strip().lower() for n in names], [c.strip().lower() for c in classes]
    if folded[0] != folded[1]:
        if sorted(folded[0]) == sorted(folded[1]):
            raise DataError(f"{source}: its categories in id order are {list(names)}, the model's classes are "
                            f"{list(classes)}: every class id would be scored against another class; {reorder}")
        log.warning("%s: its categories %s are not named as the model's classes %s; scored by position", source,
                    list(names), list(classes))


def check_valset(vs: ValSet, classes: Sequence[str], source: object,
                 reorder: str = "put the data's categories in the model's order") -> None:
    """``check_classes`` of the val set's categories, and DataError unless it has images with at
    least one labelled object: with none, every variant scores "no data" and passes the
    accuracy gate."""
    check_classes(vs.class_names(), classes, source, reorder)
    if not vs.images:
        raise DataError(f"{source}: no images")
    if not vs.gt.get("annotations"):
        raise DataError(f"{source}: the first {len(vs.images)} images have no labelled object: the accuracy gate "
                        "would have nothing to score")
    if all(a.get("iscrowd", 0) for a in vs.gt["annotations"]):
        # COCO scores no crowd box as an object to find: every class would score "no data".
        raise DataError(f"{source}: every labelled object in the first {len(vs.images)} images is a crowd region "
                        "(iscrowd 1): the accuracy gate would have nothing to score")


@dataclass
class VariantEval:
    """What the gate measured for one variant."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    detections: list[Detections] = field(default_factory=list)  # per val image, deployed threshold
    predictions: list[dict[str, Any]] = field(default_factory=list)  # COCO results, score floor


def make_backend(path: Path, threads: int, max_batch: int = 8) -> Backend:
    """The server's onnxruntime backend for ``path``, activated."""
    return open_backend(path, RuntimeSettings(threads=threads, max_batch=max_batch))


def evaluate_variant(
    name: str,
    path: Path,
    valset: ValSet,
    pre: PreprocessSpec,
    post: PostprocessSpec,
    threads: int = 2,
    batch_size: int = EVAL_BATCH,
    progress: Callable[[int, int], None] | None = None,
    backend: Backend | None = None,
    priors: np.ndarray | None = None,
) -> VariantEval:
    """Run ``path`` on every val image through the frame pipeline; KPI + detections.

    backend: an activated ``server.runtime`` backend to use instead of onnxruntime on ``path``
    (e.g. a TensorRT engine); it is deactivated afterwards either way.
    """
    from perception.kpi import evaluate_coco

    backend = backend if backend is not None else make_backend(path, threads, max(batch_size, 1))
    pipeline = FramePipeline(pre, post, valset.class_names(), priors=priors)
    cats = category_ids(valset.gt)
    ev = VariantEval(name)
    try:
        pipeline.bind_outputs(backend.outputs)
        dets = pipeline.detect_files(valset.paths, backend.infer, batch_size=batch_size, progress=progress)
    finally:
        backend.deactivate()
    for (image_id, _), d in zip(valset.images, dets, strict=True):
        ev.predictions += detections_to_results(d.boxes, d.scores, d.class_ids, image_id, cats)
        ev.detections.append(d.take(d.scores >= post.score_threshold))
    report = evaluate_coco(valset.gt, ev.predictions, score_threshold=post.score_threshold).to_dict()
    ev.metrics = {k: float(report[k]) for k in ("map50_95", "map50", "precision", "recall")}
    return ev


def evaluate_shown(
    name: str,
    path: Path,
    valset: ValSet,
    pre: PreprocessSpec,
    post: PostprocessSpec,
    threads: int,
    batch_size: int = EVAL_BATCH,
    backend: Backend | None = None,
    priors: np.ndarray | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> VariantEval:
    """``evaluate_variant``, announced through ``progress`` and with a progress bar on a terminal."""
    import sys

    from tqdm import tqdm

    progress(f"gate: evaluating {name} on {len(valset.images)} val images")
    with tqdm(total=len(valset.images), desc=f"gate {name}", unit="img", leave=False,
              disable=not sys.stderr.isatty()) as bar:
        return evaluate_variant(name, path, valset, pre, post, threads=threads, batch_size=batch_size,
                                backend=backend, priors=priors, progress=_bar_progress(bar))


def load_priors_of(post: PostprocessSpec, root: Path) -> np.ndarray | None:
    """The prior boxes an ``ssd`` spec names, read from the artifact directory ``root``."""
    from perception.pipeline import load_priors

    return load_priors(root / post.priors.file) if post.priors is not None else None


def latency_sample(valset: ValSet, pre: PreprocessSpec, post: PostprocessSpec) -> np.ndarray:
    """The (1, 3, H, W) input the server builds for the first val image."""
    pipeline = FramePipeline(pre, post, valset.class_names())
    try:
        return pipeline.model_inputs([file_frame(valset.images[0][1])])
    except Exception as exc:
        raise DataError(f"{valset.images[0][1]}: the server would refuse this val image: {exc}") from exc


def measure_latency(
    paths: dict[str, Path],
    sample: np.ndarray | dict[str, np.ndarray],
    runs: int = 30,
    threads: int = 2,
    warmup: int = 3,
    factory: Callable[[str, Path], Backend] | None = None,
) -> dict[str, dict[str, float]]:
    """Batch-1 inference latency per variant in ms (p50, p95, mean, min), timed round-robin.

    sample: one (1, 3, H, W) float32 input, or one per variant (by name). factory(name, path)
    returns an activated backend (default: onnxruntime with ``threads``). Interleaving the
    variants run by run means a burst of load from elsewhere on this shared machine slows them
    all alike, so the *ratios* between variants stay meaningful even when absolute numbers drift.
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


def gate_decision(
    limits: GateLimits,
    reference_map: float,
    variant_map: float,
    reference_latency_ms: dict[str, float],
    variant_latency_ms: dict[str, float],
) -> dict[str, Any]:
    """Judge one variant; mAP on the 0..1 scale, latencies as ``measure_latency`` gives them.

    Returns ``{"passed", "reason"}`` plus, for the checks that apply, ``map50_95_drop_points``
    / ``max_drop_points``, ``latency_ratio`` / ``max_latency_ratio`` (min vs min) and
    ``p95_ms`` / ``latency_budget_ms``. The reason states every check, each "within" or
    "outside" its limit.
    """
    checks: list[tuple[bool, str]] = []
    out: dict[str, Any] = {}
    if limits.max_drop_points is not None:
        drop = (reference_map - variant_map) * 100.0
        ok = drop <= limits.max_drop_points
        checks.append((ok, f"mAP50-95 drop {drop:+.2f} points vs fp32, {_verb(ok)} the "
                           f"{limits.max_drop_points:.2f}-point gate"))
        out |= {"map50_95_drop_points": round(drop, 4), "max_drop_points": limits.max_drop_points}
    if limits.max_latency_ratio is not None:
        ref_min, var_min = reference_latency_ms["min"], variant_latency_ms["min"]
        ratio = var_min / ref_min if ref_min > 0 else float("inf")
        ok = ratio <= limits.max_latency_ratio
        checks.append((ok, f"min latency {var_min:.2f} ms = {ratio:.2f}x fp32's {ref_min:.2f} ms, {_verb(ok)} the "
                           f"{limits.max_latency_ratio:.2f}x gate"))
        out |= {"latency_ratio": round(ratio, 4), "max_latency_ratio": limits.max_latency_ratio}
    if limits.latency_budget_ms is not None:
        p95 = variant_latency_ms["p95"]
        ok = p95 <= limits.latency_budget_ms
        checks.append((ok, f"p95 latency {p95:.2f} ms, {_verb(ok)} the {limits.latency_budget_ms:g} ms budget"))
        out |= {"p95_ms": round(p95, 4), "latency_budget_ms": limits.latency_budget_ms}
    reasons = (["reference (FP32)"] if limits.is_reference else []) + [text for _, text in checks]
    return {"passed": all(ok for ok, _ in checks), "reason": "; ".join(reasons), **out}


def _bar_progress(bar: tqdm[Any]) -> Callable[[int, int], None]:
    """A ``(done, total)`` progress callback that moves ``bar`` to ``done``."""

    def advance(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    return advance


def _verb(ok: bool) -> str:
    return "within" if ok else "outside"


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
    limits: dict[str, GateLimits],
    valset: ValSet,
    pre: PreprocessSpec,
    post: PostprocessSpec,
    runs: int = 30,
    threads: int = 2,
    reference: GateResult | None = None,
    factory: Callable[[str, Path], Backend] | None = None,
    progress: Callable[[str], None] = lambda _: None,
    priors: np.ndarray | None = None,
    batch_size: int = EVAL_BATCH,
    evaluated: dict[str, VariantEval] | None = None,
) -> dict[str, GateResult]:
    """Evaluate, time (round-robin) and judge ``variants`` (name -> model file).

    limits[name]: that variant's gate (``GateThresholds.limits``). The reference is the variant
    named ``fp32`` unless ``reference`` is given (e.g. when gating TensorRT engines against an
    earlier FP32 result). batch_size: images per inference call when scoring. evaluated: those
    of ``variants`` already scored (``evaluate_shown``), which are not scored again.
    """
    evals: dict[str, VariantEval] = {}
    for name, path in variants.items():
        if evaluated and name in evaluated:
            evals[name] = evaluated[name]
            continue
        backend = factory(name, path) if factory else None
        evals[name] = evaluate_shown(name, path, valset, pre, post, threads, batch_size, backend, priors, progress)
    progress(f"gate: timing {len(variants)} variants round-robin ({runs} runs, batch 1)")
    # Timed on the backend alone: decode and letterbox cost the same for every variant.
    sample = latency_sample(valset, pre, post)
    lat = measure_latency(variants, sample, runs, threads, factory=factory)
    ref_metrics = reference.metrics if reference else evals["fp32"].metrics
    ref_latency = reference.latency_ms if reference else lat["fp32"]
    ref_dets = reference.detections if reference else evals["fp32"].detections
    out = {}
    for name, ev in evals.items():
        gate = gate_decision(limits[name], ref_metrics["map50_95"], ev.metrics["map50_95"], ref_latency, lat[name])
        out[name] = GateResult(ev.metrics, lat[name], parity(ref_dets, ev.detections), gate, ev.detections)
        progress(f"  {name:<14} mAP50-95 {100 * ev.metrics['map50_95']:6.2f}  p50 {lat[name]['p50']:6.2f} ms  "
                 f"min {lat[name]['min']:6.2f} ms  {'PASS' if gate['passed'] else 'FAIL'}: {gate['reason']}")
    return out
