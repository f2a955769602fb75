"""The build: checkpoint -> folded, exported, quantized, gated variants + manifest + report.

Everything is written into a temporary sibling of the output directory and renamed into place
at the very end, so a failed or interrupted build never leaves a half-written artifact.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from build_engine.artifact_dir import replace_dir, staging_dir
from build_engine.provenance import git_sha, library_versions
from build_engine.thresholds import GateLimits, GateThresholds  # also build_cli's import of GateThresholds
from perception.errors import ConfigError, ModelError
from perception.manifest import (
    Calibration,
    Manifest,
    PostprocessSpec,
    Precision,
    PreprocessSpec,
    QdqTwin,
    SourceFile,
    Variant,
    Verification,
    Weights,
    save_manifest,
    sha256_file,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "default" / "detector.pt"
# The server batches across cameras; 8 covers a vehicle's camera ring in one call.
MAX_BATCH = 8
# Seeds of the generated sets, the same as the training config's (configs/default.yaml,
# build_engine.config.DataConfig): the gate scores the training run's val split; calibration
# uses the first images of the *train* split, so it never sees a val image. Image i of a
# generated set depends only on (seed, i), so the first n images are the same however many
# the training run generated.
VAL_SEED = 2
CALIB_SEED = 1


@dataclass(frozen=True)
class BuildOptions:
    """Every knob of ``perception build``; validated on construction."""

    out_dir: Path
    checkpoint: Path = DEFAULT_CHECKPOINT
    pruned: tuple[Path, ...] = ()
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    calibrator: str = "minmax"
    # Each INT8 model also in the form TensorRT builds from: signed INT8, every zero point 0
    # (onnxruntime's faster U8 model has fitted zero points, which TensorRT rejects).
    tensorrt_qdq: bool = True
    tensorrt_calibrator: str = "percentile"
    calib_images: int = 48
    val_images: int = 300  # the training run's whole val split (DataConfig.val_images)
    data_dir: Path | None = None  # val dataset dir (annotations.json + images/); generated if None
    calib_dir: Path | None = None  # calibration images; a generated set (other seed) if None
    image_width: int = 640
    image_height: int = 360
    seed: int = 0
    opset: int = 17
    max_batch: int = MAX_BATCH
    nms_in_graph: bool = False
    gates: GateThresholds = field(default_factory=GateThresholds)
    continue_on_fail: bool = False
    latency_runs: int = 30
    threads: int = 2
    report: bool = True
    scaling: bool = True  # the report's scaling table (exports and times ~11 models)
    scaling_val_images: int = 32
    name: str = ""
    # (width, height) to export the checkpoint at instead of its trained input size (YOLO-style
    # family only: fully convolutional, its decode grid follows the feature maps). The same
    # weights at a larger input see far, small objects (docs/tracking.md); gated like any build.
    input_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        from build_engine.calibration import CALIBRATORS

        bad = [p for p in self.precisions if p not in ("fp32", "fp16", "int8")]
        if bad or "fp32" not in self.precisions:
            raise ConfigError(f"precisions must include fp32 and be among fp32/fp16/int8, got {self.precisions}")
        for what, cal in (("calibrator", self.calibrator), ("tensorrt_calibrator", self.tensorrt_calibrator)):
            if cal not in CALIBRATORS:
                raise ConfigError(f"{what} must be one of {sorted(CALIBRATORS)}, got {cal!r}")
        if self.calib_images < 1 or self.val_images < 1:
            raise ConfigError("calib_images and val_images must be >= 1")
        if self.opset < 17:
            raise ConfigError(f"opset must be >= 17, got {self.opset}")
        if not 1 <= self.max_batch <= 64 or self.latency_runs < 1 or self.threads < 1:
            raise ConfigError("max_batch must be 1..64, latency_runs and threads >= 1")
        if self.input_size is not None and any(v < 32 or v % 32 for v in self.input_size):
            raise ConfigError(f"input size must be multiples of 32 (the largest stride), got {self.input_size}")


@dataclass(frozen=True)
class _Built:
    """A model file the build made, before it is gated and becomes a manifest variant."""

    path: Path
    precision: Precision
    counts: dict[str, int]
    family: str
    parent: str
    weights: Weights
    calibration: Calibration | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint's model (eval mode) and what the manifest needs to know about it."""

    model: Any  # nn.Module; typed loosely so importing this module does not import torch
    classes: tuple[str, ...]
    input_width: int
    input_height: int
    checkpoint: Path
    checkpoint_sha256: str
    meta: dict[str, Any]


def load_model(checkpoint: Path, input_size: tuple[int, int] | None = None) -> LoadedModel:
    """Load a (possibly pruned) checkpoint; ModelError with a one-line reason otherwise.

    ``input_size`` (width, height): export it at that size instead of its trained one; the
    YOLO-style family only (the others' priors and proposals are sized for their input)."""
    from build_engine.pruned_checkpoint import load_any_checkpoint

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        hint = " (train one with `perception train`, or pass --checkpoint)" if checkpoint == DEFAULT_CHECKPOINT else ""
        raise ModelError(f"{checkpoint}: no such checkpoint{hint}")
    model, meta = load_any_checkpoint(checkpoint)
    w, h = (int(v) for v in meta.input_size)
    if input_size is not None and input_size != (w, h):
        layout = getattr(model, "output_layout", "yolo_obj")
        resize = getattr(model, "resize_input", None)
        if layout != "yolo_obj" or not callable(resize):
            raise ConfigError(f"{checkpoint}: --input-size works for the YOLO-style family only (this one's "
                              f"outputs are {layout!r}, sized for its {w}x{h} input)")
        w, h = input_size
        resize(w, h)
    return LoadedModel(model, tuple(meta.classes), w, h, checkpoint, sha256_file(checkpoint), meta.to_dict())


def artifact_version(lm: LoadedModel, pruned: Sequence[LoadedModel] = ()) -> str:
    """The artifact's version: what went into it, so that two different artifacts never share
    one (the server's degrader steps between variants only within one version: an artifact
    rebuilt in place at another input size must not pass for the one it replaced). The
    checkpoint's sha256; then, when there are any, the pruned checkpoints' (one short hash
    over them all); then the input size when it is not the trained one (``--input-size``)."""
    version = f"0.1.0+{lm.checkpoint_sha256[:8]}"
    if pruned:
        version += ".p" + hashlib.sha256("".join(pm.checkpoint_sha256 for pm in pruned).encode()).hexdigest()[:8]
    trained = tuple(int(v) for v in lm.meta.get("input_size", (lm.input_width, lm.input_height)))
    if trained != (lm.input_width, lm.input_height):
        version += f".{lm.input_width}x{lm.input_height}"
    return version


def preprocess_spec(lm: LoadedModel) -> PreprocessSpec:
    """The detector family's input contract: letterboxed RGB in [0, 1], NCHW."""
    return PreprocessSpec(input_width=lm.input_width, input_height=lm.input_height, letterbox=True, color_order="RGB")


def postprocess_spec(lm: LoadedModel) -> PostprocessSpec:
    """How the family's outputs are read: ``yolo_obj``, ``ssd`` or ``nms_detections`` (two-stage)."""
    return PostprocessSpec(output_layout=getattr(lm.model, "output_layout", "yolo_obj"))


def max_batch_of(lm: LoadedModel, wanted: int) -> int:
    """A family that exports a fixed batch (the two-stage family: 1) serves that batch."""
    fixed = getattr(lm.model, "export_batch", None)
    return min(wanted, int(fixed)) if fixed else wanted


def provenance(lm: LoadedModel, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "git_sha": git_sha(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "libraries": library_versions(),
        "checkpoint": {"file": lm.checkpoint.name, "sha256": lm.checkpoint_sha256, "meta": lm.meta},
        **(extra or {}),
    }


def export_variant_onnx(lm: LoadedModel, path: Path, opset: int = 17) -> tuple[Path, dict[str, int]]:
    """Fold BN, export ``lm.model`` to ``path``; return the path and its MAC/param counts
    (``model_macs``)."""
    from build_engine.export import export_onnx
    from build_engine.fold import fold_batchnorm
    from build_engine.profile import model_macs, profile_model

    folded, _ = fold_batchnorm(lm.model)
    prof = profile_model(folded, (1, 3, lm.input_height, lm.input_width))
    macs = model_macs(folded, prof)
    export_onnx(folded, path, (lm.input_height, lm.input_width), opset=opset)
    check_export(lm, path)
    return path, {"macs": macs, "params": prof.total_params}


def check_export(lm: LoadedModel, path: Path, tolerance: float = 1e-3) -> None:
    """ModelError unless the exported model computes what the checkpoint does: its raw outputs
    on a seeded input, each column of an output's last axis within ``tolerance`` x max(1, the
    column's largest magnitude). Every gate is relative to the exported FP32 model, so an error
    in BN folding, the export or onnxslim would move the reference and every variant together,
    and no gate could see it. A family with NMS in its graph (``nms_detections``), where a
    rounding difference may keep another box, is held to its detections instead
    (``_check_post_nms_export``).

    Per column, because one output can hold pixels beside probabilities: a YOLO-style row is
    (x1, y1, x2, y2 in input pixels, objectness, class scores...), and one scale for the whole
    output (about the input width) would let every score be off by 0.5 at a 512-pixel width.
    Box coordinates are so held to a fraction of their range, scores (<= 1) to ``tolerance``
    itself. The SSD-style family's outputs (normalised boxes, probabilities) are of order 1."""
    import numpy as np
    import torch

    from build_engine.evaluate import onnx_runner, torch_runner

    if getattr(lm.model, "output_layout", "yolo_obj") == "nms_detections":
        _check_post_nms_export(lm, path)
        return
    batch = int(getattr(lm.model, "export_batch", None) or 2)
    x = np.random.default_rng(0).random((batch, 3, lm.input_height, lm.input_width), dtype=np.float32)
    with torch.no_grad():
        want = torch_runner(lm.model)(x)
    run, close = onnx_runner(path, threads=1)
    try:
        got = run(x)
    finally:
        close()
    for name, ref in want.items():
        out = got.get(name)
        if out is None or out.shape != ref.shape:
            what = "missing" if out is None else f"of shape {out.shape}"
            raise ModelError(f"{path.name}: output {name!r} is {what}, the checkpoint's is of shape {ref.shape}: "
                             "the export changed the model")
        cols = ref.shape[-1]
        scale = np.maximum(1.0, np.abs(ref).reshape(-1, cols).max(0))
        diff = np.abs(out - ref).reshape(-1, cols).max(0)
        bad = np.flatnonzero(~(diff <= tolerance * scale))  # a NaN fails too
        if bad.size:
            j = int(bad[0])
            raise ModelError(f"{path.name}: output {name!r} column {j} differs from the checkpoint's by "
                             f"{diff[j]:.3g} (scale {scale[j]:.3g}): the BN folding or the export changed the model")


def _check_post_nms_export(lm: LoadedModel, path: Path, min_matched: float = 0.9, iou: float = 0.9) -> None:
    """ModelError unless the exported post-NMS model detects what the checkpoint does on two
    generated road scenes: at least ``min_matched`` of the larger of the two detection sets
    paired, same class and IoU >= ``iou``. (Skipped before, so an export of another model, or a
    broken fold, passed for a two-stage checkpoint: nothing checked its outputs.) Random input,
    as for the other families, gives a trained two-stage model no proposals to compare."""
    import numpy as np
    import torch

    from build_engine.data.scene import random_image
    from build_engine.evaluate import onnx_runner, torch_runner
    from perception.boxes import box_iou
    from perception.preprocess import normalize_batch

    spec = preprocess_spec(lm)
    run, close = onnx_runner(path, threads=1)
    try:
        for seed in (0, 1):
            x = normalize_batch([random_image(seed, lm.input_width, lm.input_height).image], spec)
            with torch.no_grad():
                want = torch_runner(lm.model)(x)
            got = run(x)
            sets = []
            for out in (want, got):
                n = int(np.asarray(out["num_dets"]).reshape(-1)[0])
                sets.append((np.asarray(out["det_boxes"])[0, :n], np.asarray(out["det_classes"])[0, :n]))
            (wb, wc), (gb, gc) = sets
            if not max(len(wb), len(gb)):
                continue
            ious = box_iou(np.asarray(wb, np.float32), np.asarray(gb, np.float32))
            ious[wc[:, None] != gc[None, :]] = 0.0
            matched = int((ious.max(axis=1) >= iou).sum()) if ious.size else 0
            if matched < min_matched * max(len(wb), len(gb)):
                raise ModelError(f"{path.name}: on a generated scene it detects {len(gb)} objects where the checkpoint "
                                 f"detects {len(wb)}, {matched} of them alike (class, IoU >= {iou}): the BN folding or "
                                 "the export changed the model")
    finally:
        close()


def _variant(lm: LoadedModel, name: str, file: Path, precision: Precision, max_batch: int, **kw: Any) -> Variant:
    return Variant(
        name=name,
        file=file.name,
        precision=precision,
        sha256=sha256_file(file),
        input_shape=(-1, 3, lm.input_height, lm.input_width),
        max_batch=max_batch,
        **kw,
    )


def export_fp32_artifact(checkpoint: Path, out_dir: Path) -> Path:
    """The fast path for tests and demos: fold + export FP32 + manifest, no gating.

    Writes ``out_dir/model.fp32.onnx`` and ``out_dir/manifest.json``; returns the manifest path.
    """
    lm = load_model(Path(checkpoint))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path, counts = export_variant_onnx(lm, out_dir / "model.fp32.onnx")
    variant = _variant(lm, "fp32", onnx_path, Precision.FP32, max_batch_of(lm, MAX_BATCH), **counts,
                       gate={"passed": True, "reason": "reference (not gated)"})
    manifest = Manifest(
        name=lm.checkpoint.parent.name or "model",
        version=artifact_version(lm),
        classes=lm.classes,
        preprocess=preprocess_spec(lm),
        postprocess=postprocess_spec(lm),
        variants=(variant,),
        default_variant="fp32",
        provenance=provenance(lm),
    )
    return save_manifest(manifest, out_dir)


Progress = Callable[[str], None]


def _noop(_: str) -> None:
    pass


def tensorrt_available() -> bool:
    """True iff the ``tensorrt`` package imports and a CUDA GPU is visible."""
    from server.runtime.availability import tensorrt_installed

    if not tensorrt_installed():
        return False
    try:
        import tensorrt  # noqa: F401
    except Exception:  # a broken install is "not available" here, not a build failure
        return False
    return Path("/dev/nvidiactl").exists() or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def _generated(work: Path, split: str, n: int, seed: int, opts: BuildOptions, progress: Progress) -> Path:
    """A generated dataset: the training run's cached split when it holds at least ``n`` images
    of this seed and size (image i depends only on (seed, i), so its first n images are the
    set wanted; callers take the first n), else generated fresh into ``work``."""
    from build_engine.config import DataConfig
    from build_engine.data.generate import generate_dataset

    size = f"{opts.image_width}x{opts.image_height}"
    cache = Path(DataConfig().cache_dir).expanduser()
    for cached in sorted(cache.glob(f"{split}-s{seed}-n*-{size}")) if cache.is_dir() else []:
        count = cached.name.split("-n", 1)[1].split("-", 1)[0]
        if count.isdigit() and int(count) >= n and (cached / ".complete").is_file():
            progress(f"using the first {n} images of the training run's cached {split} set {cached}")
            return cached
    progress(f"generating {n} {split} images (seed {seed}, {size})")
    return Path(generate_dataset(work / f"{split}-s{seed}-n{n}-{size}", n, seed, opts.image_width, opts.image_height))


def _prepare_data(opts: BuildOptions, work: Path, progress: Progress) -> tuple[Path, list[Path], Path]:
    """(val dataset dir, calibration image paths, calibration root)."""
    from build_engine.calibration import list_images

    val_dir = opts.data_dir or _generated(work, "val", opts.val_images, VAL_SEED + opts.seed, opts, progress)
    calib_root = opts.calib_dir
    if calib_root is None:
        calib_root = _generated(work, "train", opts.calib_images, CALIB_SEED + opts.seed, opts, progress)
    calib = list_images(Path(calib_root), limit=opts.calib_images)
    return Path(val_dir), calib, Path(calib_root)


def run_build(opts: BuildOptions, progress: Progress = _noop) -> tuple[Path, bool]:
    """The full build; return (manifest path, every gated variant passed).

    Bad input (missing / corrupt checkpoint, empty calibration set, ...) raises before
    anything is moved to ``opts.out_dir``. A failed gate still writes the artifact with the
    variant marked failed; the caller decides the exit code.
    """
    from build_engine import gate as g
    from build_engine.calibration import ImageCalibrationReader, calibration_set_hash
    from build_engine.quantize import convert_fp16, quantize_int8

    progress(f"loading {opts.checkpoint}")
    lm = load_model(opts.checkpoint, opts.input_size)
    pruned = [load_model(p, opts.input_size) for p in opts.pruned]
    for pm in pruned:
        if (pm.input_width, pm.input_height, pm.classes) != (lm.input_width, lm.input_height, lm.classes):
            raise ConfigError(f"{pm.checkpoint}: input size / classes differ from {lm.checkpoint}")
    pre, post = preprocess_spec(lm), postprocess_spec(lm)
    staging = staging_dir(opts.out_dir)
    try:
        with tempfile.TemporaryDirectory(prefix="build_work_") as tmp:
            work = Path(tmp)
            val_dir, calib, calib_root = _prepare_data(opts, work, progress)
            valset = g.ValSet.load(val_dir, limit=opts.val_images)
            g.check_valset(valset, lm.classes, val_dir)
            calib_hash = calibration_set_hash(calib, calib_root)
            built: dict[str, _Built] = {}

            progress(f"folding BatchNorm and exporting FP32 ONNX (opset {opts.opset:d}, dynamic batch, onnxslim)")
            fp32, counts = export_variant_onnx(lm, staging / "model.fp32.onnx", opts.opset)
            base_weights = Weights(lm.checkpoint.name, lm.checkpoint_sha256)
            built["fp32"] = _Built(fp32, Precision.FP32, counts, "base", "", base_weights)
            if "fp16" in opts.precisions:
                progress("converting to FP16 (IO and box decode kept FP32)")
                built["fp16"] = _Built(convert_fp16(fp32, staging / "model.fp16.onnx"), Precision.FP16, counts, "base",
                                       "fp32", base_weights)
            calib_info = {"calibrator": opts.calibrator, "images": [str(p.relative_to(calib_root)) for p in calib],
                          "sha256": calib_hash}
            quant_jobs = [("int8", "fp32")] if "int8" in opts.precisions else []
            for i, pm in enumerate(pruned):
                tag = "pruned" if len(pruned) == 1 else f"pruned{i + 1}"
                progress(f"exporting pruned checkpoint {pm.checkpoint.name} as {tag}_fp32")
                p32, pcounts = export_variant_onnx(pm, staging / f"model.{tag}.fp32.onnx", opts.opset)
                weights = Weights(pm.checkpoint.name, pm.checkpoint_sha256, pm.meta.get("extra", {}).get("pruned", {}))
                built[f"{tag}_fp32"] = _Built(p32, Precision.FP32, pcounts, tag, "", weights)
                if "fp16" in opts.precisions:  # what a GPU device builds its FP16 engine from
                    built[f"{tag}_fp16"] = _Built(convert_fp16(p32, staging / f"model.{tag}.fp16.onnx"), Precision.FP16,
                                                  pcounts, tag, f"{tag}_fp32", weights)
                if "int8" in opts.precisions:
                    quant_jobs.append((f"{tag}_int8", f"{tag}_fp32"))
            trt_qdq: dict[str, Any] = {}  # INT8 variant -> its TensorRT Q/DQ model (QuantizeResult)
            for name, parent in quant_jobs:
                src = built[parent]
                progress(f"quantizing {name} (Q/DQ, per-channel weights, U8 activations, "
                         f"{opts.calibrator} on {len(calib)} images)")
                reader = ImageCalibrationReader(calib, pre)
                q = quantize_int8(src.path, staging / f"model.{name.replace('_', '.')}.onnx", reader, opts.calibrator)
                built[name] = _Built(q.path, Precision.INT8, src.counts, src.family, parent, src.weights,
                                     Calibration(q.calibrator, calib_hash, tuple(q.excluded_nodes)))
                if q.calibrator != opts.calibrator:  # it fell back: record what calibrated, not what was asked
                    calib_info["calibrator"] = f"{q.calibrator} (asked for {opts.calibrator}, which failed)"
                if opts.tensorrt_qdq:
                    progress(f"quantizing {name} for TensorRT (signed INT8, zero points 0, {opts.tensorrt_calibrator})")
                    trt_qdq[name] = quantize_int8(src.path, staging / f"model.{name.replace('_', '.')}.trt.onnx",
                                                  ImageCalibrationReader(calib, pre), opts.tensorrt_calibrator,
                                                  target="tensorrt")
            order = list(Precision)
            built = dict(sorted(built.items(), key=lambda kv: (kv[1].family != "base", kv[1].family,
                                                               order.index(kv[1].precision))))
            extra: dict[str, Any] = {}
            if opts.nms_in_graph and post.output_layout == "yolo_obj":
                extra["nms_in_graph"] = _write_nms_model(fp32, staging / "model.fp32.nms.onnx", post)
            elif opts.nms_in_graph:  # it finished without the file asked for, and said nothing
                log.warning("--nms-in-graph writes model.fp32.nms.onnx for the YOLO-style family only; this model "
                            "(layout %s) gets none%s", post.output_layout,
                            " (its graph ends in NMS already)" if post.output_layout == "nms_detections" else "")

            limits = {n: opts.gates.limits(b.family, b.precision) for n, b in built.items()}
            # A TensorRT Q/DQ model is scored here through onnxruntime (the same quantization
            # grid TensorRT will use) against its INT8 variant's accuracy gate; its CPU speed is
            # not judged, and the engine built from it is gated again on the device.
            trt_keys = {n: f"{n}:trt" for n in trt_qdq}
            limits |= {trt_keys[n]: GateLimits(limits[n].max_drop_points, None) for n in trt_qdq}
            gated = {**{n: b.path for n, b in built.items()}, **{trt_keys[n]: q.path for n, q in trt_qdq.items()}}
            results = g.run_gate(gated, limits, valset, pre, post, opts.latency_runs, opts.threads, progress=progress)
            variants = []
            for name, b in built.items():
                r = results[name]
                twin = None
                if name in trt_qdq:
                    t = results[trt_keys[name]]
                    if not t.gate["passed"]:
                        log.warning("the TensorRT Q/DQ model of %s failed its gate; devices will not build an INT8 "
                                    "engine from it (try another --tensorrt-calibrator)", name)
                    twin = QdqTwin(trt_qdq[name].path.name, sha256_file(trt_qdq[name].path), trt_qdq[name].calibrator,
                                   metrics=t.metrics, parity=t.parity, gate=t.gate)
                variants.append(_variant(lm, name, b.path, b.precision, max_batch_of(lm, opts.max_batch), **b.counts,
                                         family=b.family,
                                         parent=b.parent, weights=b.weights, calibration=b.calibration,
                                         tensorrt_qdq=twin, metrics=r.metrics, latency_ms=r.latency_ms,
                                         parity=r.parity, gate=r.gate))
            if tensorrt_available():
                from build_engine.tensorrt_variants import build_tensorrt_variants

                variants += build_tensorrt_variants(staging, variants, results["fp32"], valset, pre, post, opts.gates,
                                                    max_batch_of(lm, opts.max_batch), opts.latency_runs, opts.threads,
                                                    progress, lm.classes)
            else:
                log.warning("TensorRT not available here: skipping engine build")
            all_passed = all(v.passed for v in variants)
            passed = [v for v in variants if v.passed]
            # By the least-disturbed run: p50 swings with other load on a shared machine.
            default = min(passed or variants, key=lambda v: v.latency_ms["min"]).name
            progress(f"default variant: {default} (the fastest that passed its gate)" if passed else
                     f"default variant: {default} (no variant passed its gate: the fastest of all)")
            manifest = Manifest(
                name=opts.name or lm.checkpoint.parent.name or "model",
                version=artifact_version(lm, pruned),
                classes=lm.classes,
                preprocess=pre,
                postprocess=post,
                variants=tuple(variants),
                default_variant=default,
                verification=verification_record(staging, valset, results),
                provenance=provenance(lm, {"calibration": calib_info, "val_set": {
                    "images": len(valset.images), "source": str(opts.data_dir) if opts.data_dir else
                    f"generated seed {VAL_SEED + opts.seed} {opts.image_width}x{opts.image_height}"}}),
                extra={**extra, **opts.gates.to_manifest()},
            )
            save_manifest(manifest, staging)
            if opts.report:
                from build_engine.report import build_report

                scaling_runs = max(3, opts.latency_runs // 6) if opts.scaling else 0
                build_report(staging, manifest, lm.model, valset, calib, pre, post, scaling_runs,
                             opts.scaling_val_images, opts.threads, progress)
        replace_dir(staging, opts.out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Path(opts.out_dir) / "manifest.json", all_passed


VERIFY_FRAMES = 4  # frames shipped for the server's check before it swaps a model in


def verification_record(staging: Path, valset: Any, results: dict[str, Any], n: int = VERIFY_FRAMES) -> Verification:
    """Copy the first ``n`` val images into ``staging/verify/`` and record what each gated
    variant detected on them (its gate run's detections at the deployed threshold)."""
    (staging / "verify").mkdir(exist_ok=True)
    frames = []
    for i, (_, path) in enumerate(valset.images[:n]):
        dst = staging / "verify" / f"{i:03d}{Path(path).suffix.lower()}"
        shutil.copyfile(path, dst)
        frames.append(SourceFile(f"verify/{dst.name}", sha256_file(dst)))
    expected = {}
    for name, r in results.items():
        if ":" in name:  # the TensorRT Q/DQ twins' gate runs; not variants of their own
            continue
        expected[name] = [
            [[round(float(v), 3) for v in b] + [round(float(s), 5), float(c)]
             for b, s, c in zip(d.boxes, d.scores, d.class_ids, strict=True)]
            for d in r.detections[: len(frames)]
        ]
    return Verification(tuple(frames), expected)


def _write_nms_model(fp32: Path, path: Path, post: PostprocessSpec) -> dict[str, Any]:
    import onnx

    from build_engine.export import append_nms, save_onnx

    save_onnx(append_nms(onnx.load(str(fp32)), post.iou_threshold, post.score_threshold, post.max_detections), path)
    return {"file": path.name, "sha256": sha256_file(path),
            "output": "selected_indices (K, 3): batch, class, candidate"}
