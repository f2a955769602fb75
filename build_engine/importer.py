"""``perception import``: a detector trained elsewhere, as an artifact this project can serve.

The ONNX model is checked (``build_engine.onnx_inspect``: it loads, takes a float32
channel-first image of a known size and a dynamic batch or 1, its outputs fit the declared
layout and the class list, and one pad-coloured frame goes through it and the layout's decoder
as the server would run it, giving boxes and scores that are not all NaN / Inf, then a batch
of them: a model that runs one frame at a time only is recorded with max batch 1) and copied
into a staging directory beside ``--out``. Without data, the artifact has the FP32 model
only and says that nothing was measured. With labelled data (COCO or YOLO), the FP32 model
must first find the labelled objects (mAP50 at least ``--min-map50``): one that finds nothing
is almost always read wrongly (layout, colour order, scale, normalised boxes, class order),
and would otherwise pass, as FP16 and INT8 are judged against it. Then the same build steps
as ``perception build`` follow: FP16 and calibrated INT8 variants, every variant scored
through the one frame pipeline with the project's KPI, timed round-robin, gated against FP32,
and the fastest variant that passed becomes the default. The manifest is written once and the
directory moved into place whole: a failure leaves nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from build_engine.calibration import ImageCalibrationReader
from build_engine.gate import ValSet, VariantEval, check_valset
from build_engine.onnx_inspect import input_name, input_rank, probe_model, read_onnx
from build_engine.thresholds import GateThresholds
from perception.errors import ConfigError, DataError, ModelError
from perception.layouts import DECODERS
from perception.manifest import (
    Calibration,
    Manifest,
    PostprocessSpec,
    Precision,
    PreprocessSpec,
    Priors,
    Variant,
    save_manifest,
    sha256_file,
)

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImportOptions:
    onnx: Path
    layout: str
    classes: Path
    out: Path
    input_size: tuple[int, int] | None = None  # (width, height) when the model's is dynamic
    data: Path | None = None
    color_order: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    letterbox: bool = True
    pad_value: int = 114  # the letterbox's padding grey, 0..255 (most YOLO exports: 114)
    outputs: dict[str, str] = field(default_factory=dict)  # role -> output name
    priors: Path | None = None
    variances: tuple[float, float] = (0.1, 0.2)
    class_offset: int = 0
    score_threshold: float = 0.25
    iou_threshold: float = 0.5
    max_detections: int = 100
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    calibrator: str = "minmax"
    calib_images: int = 48
    val_images: int = 300
    latency_runs: int = 30
    threads: int = 2
    max_batch: int = 8
    name: str = ""
    # With data: the least mAP50 (0..1) the FP32 model must reach; 0 = no check. Low enough
    # that any model read rightly clears it, high enough that one read wrongly (mAP50 ~0) does not.
    min_map50: float = 0.01

    def __post_init__(self) -> None:
        if self.layout not in DECODERS:
            raise ConfigError(f"unknown layout {self.layout!r}; choose one of {sorted(DECODERS)}")
        if self.priors is not None and self.layout != "ssd":
            raise ConfigError("--priors only applies to --layout ssd")
        # Only a post-NMS model's class ids are read as numbers; every other layout takes the
        # class from a column index, where an offset would be accepted and silently do nothing.
        if self.class_offset and self.layout != "nms_detections":
            raise ConfigError("--class-offset only applies to --layout nms_detections (other layouts take the class "
                              "from the column of its score, where there is no background id to skip)")
        if not 0 <= self.pad_value <= 255:
            raise ConfigError(f"--pad-value must be in 0..255, got {self.pad_value}")
        if not 0 <= self.min_map50 <= 1:
            raise ConfigError(f"--min-map50 must be in 0..1 (0 turns the check off), got {self.min_map50}")


def load_valset(data: Path, classes: tuple[str, ...], limit: int) -> ValSet:
    """Labelled images (a COCO JSON file, or a COCO / YOLO dataset folder) as a ValSet whose
    category ids, in order, are the model's classes: the same names in another order is refused
    (every id would be scored against another class); other names are only warned about (a
    dataset may name its classes its own way). Images without a labelled object are refused:
    every variant would score "no data" and pass the accuracy gate."""
    from build_engine.data.formats import read_labelled_set, samples_to_coco

    if data.suffix.lower() == ".json" and data.is_file():
        vs = _coco_json_valset(data, limit)
    else:
        ds = read_labelled_set(data)
        samples = ds.samples[:limit]
        gt = samples_to_coco(samples, ds.classes, ds.root)
        vs = ValSet(ds.root, gt, tuple((s.image_id, s.file) for s in samples))
    check_valset(vs, classes, data, reorder="reorder --classes to the data's order (or the data to the model's)")
    return vs


def calibration_images(data: Path, skip: int, count: int) -> list[Path]:
    """``count`` images of ``data`` after its first ``skip`` (the scored ones), in the val set's
    order: INT8 is calibrated on images the gate does not score, as the build does. Fewer when
    the data has fewer."""
    from build_engine.data.formats import read_labelled_set

    if data.suffix.lower() == ".json" and data.is_file():
        from perception.coco import load_coco

        ds = load_coco(data)
        return [_coco_image(data, ds, i) for i in sorted(ds.images)[skip: skip + count]]
    return [Path(s.file) for s in read_labelled_set(data).samples[skip: skip + count]]


def _coco_image(path: Path, ds: Any, image_id: int) -> Path:
    """The file of a COCO JSON's image: beside the JSON, or in images/ beside it."""
    name = ds.images[image_id].file_name
    for cand in (path.parent / name, path.parent / "images" / name):
        if cand.is_file():
            return cand
    raise DataError(f"{path}: image {name!r} (id {image_id}) is neither beside the JSON nor in images/")


def _coco_json_valset(path: Path, limit: int) -> ValSet:
    from perception.coco import load_coco

    ds = load_coco(path)
    ids = sorted(ds.images)[:limit]
    images = [(i, _coco_image(path, ds, i)) for i in ids]
    keep = set(ids)
    gt = dict(ds.raw)
    gt["images"] = [im for im in ds.raw["images"] if im["id"] in keep]
    gt["annotations"] = [a for a in ds.raw.get("annotations", []) if a["image_id"] in keep]
    return ValSet(path.parent, gt, tuple(images))


def run_import(opts: ImportOptions, progress: Progress = lambda _: None) -> Path:
    """Import ``opts.onnx``; return the manifest path. Raises ConfigError / DataError /
    ModelError / ManifestError in one line; ``opts.out`` is untouched on failure."""
    import onnx

    from build_engine.artifact_dir import replace_dir, staging_dir
    from build_engine.build import verification_record
    from build_engine.data.formats import read_classes
    from build_engine.provenance import library_versions

    proto, size, batch = read_onnx(opts.onnx)
    if size is None and opts.input_size is None:
        raise ConfigError(f"{opts.onnx}: the input height/width are dynamic; pass --input-size WxH")
    if size is not None and opts.input_size is not None and size != opts.input_size:
        raise ConfigError(f"{opts.onnx}: the model's input is {size[0]}x{size[1]}, not --input-size "
                          f"{opts.input_size[0]}x{opts.input_size[1]}")
    width, height = size or opts.input_size  # type: ignore[misc]  # one of them is set (checked above)
    _warn_mixed_units(opts)
    classes = read_classes(opts.classes)
    # Bad data is refused before anything is written or run.
    valset = load_valset(opts.data, classes, opts.val_images) if opts.data is not None else None
    pre = PreprocessSpec(width, height, letterbox=opts.letterbox, pad_value=opts.pad_value,
                         color_order=opts.color_order, scale=opts.scale, mean=opts.mean, std=opts.std)
    staging = staging_dir(opts.out)
    try:
        src = staging / "model.fp32.onnx"
        onnx.save(proto, str(src))
        priors = None
        if opts.priors is not None:
            priors = _stage_priors(opts.priors, staging, opts.variances)
        post = PostprocessSpec(output_layout=opts.layout, score_threshold=opts.score_threshold,
                               iou_threshold=opts.iou_threshold, max_detections=opts.max_detections,
                               outputs=dict(opts.outputs), priors=priors, class_offset=opts.class_offset)
        roles, max_batch = probe_model(src, opts.onnx, pre, post, classes, staging, dynamic_size=size is None,
                                       max_batch=min(opts.max_batch, batch or opts.max_batch))
        progress(f"outputs bound as {opts.layout}: " + ", ".join(f"{r}={n}" for r, n in roles.items()))
        # -1 where the ONNX leaves an axis dynamic: a TensorRT engine of this file is built for
        # the manifest's size then, and that size is part of the engine's name (fingerprint).
        input_shape = (batch or -1, 3, height if size else -1, width if size else -1)
        variants: list[Variant]
        verification = None
        if valset is None:
            variants = [Variant("fp32", src.name, Precision.FP32, sha256_file(src), input_shape=input_shape,
                                max_batch=max_batch, gate={"passed": True, "reason": "not measured: imported without "
                                                           "--data (no accuracy, latency or parity measured)"})]
            progress("no --data: FP32 only, nothing measured")
        else:
            assert opts.data is not None  # a valset comes from --data
            calib = calibration_images(opts.data, len(valset.images), opts.calib_images)
            if not calib:
                log.warning("%s has no images beyond the %d scored: INT8 is calibrated on scored images, so its "
                            "accuracy gate is optimistic (give more images, or fewer --val-images)", opts.data,
                            len(valset.images))
                calib = [p for _, p in valset.images[: opts.calib_images]]
            variants, results = _measured_variants(opts, valset, src, staging, pre, post, input_shape, max_batch,
                                                   progress, calib, input_name(proto), input_rank(proto) == 3)
            # The frames a device checks the model on before swapping it in, as the build ships them.
            verification = verification_record(staging, valset, results)
        passed = [v for v in variants if v.passed]
        default = min(passed, key=lambda v: v.latency_ms.get("min", float("inf"))).name if passed else "fp32"
        manifest = Manifest(
            name=opts.name or opts.onnx.stem, version=import_version(opts.onnx, classes, pre, post, input_shape),
            classes=classes,
            preprocess=pre, postprocess=post, variants=tuple(variants), default_variant=default,
            architecture="imported", verification=verification,
            provenance={"imported_from": {"file": opts.onnx.name, "sha256": sha256_file(opts.onnx)},
                        "data": str(opts.data) if opts.data else None, "libraries": library_versions()},
        )
        save_manifest(manifest, staging)
        replace_dir(staging, opts.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Path(opts.out) / "manifest.json"


def _warn_mixed_units(opts: ImportOptions) -> None:
    """Warn when --mean or --std look like 0..255 values while --scale brings pixels to 0..1:
    they apply after scaling, and ImageNet's (123.675, ...) with the default 1/255 leave every
    input far outside what the model was trained on."""
    if opts.scale >= 1:
        return
    for flag, values in (("--mean", opts.mean), ("--std", opts.std)):
        if max(values) > 1:
            log.warning("%s %s looks like 0..255 units, but it applies after --scale %.6g, which brings pixels to "
                        "0..%.6g: divide it by 255 (e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225), or pass "
                        "--scale 1 if the model takes 0..255 pixels", flag, ",".join(f"{v:g}" for v in values),
                        opts.scale, 255 * opts.scale)


def _check_reference(opts: ImportOptions, reference: VariantEval, valset: ValSet) -> None:
    """ModelError unless the FP32 model's mAP50 on the labelled data reaches ``--min-map50``.

    FP16 and INT8 are gated by their drop against FP32, so a model that finds nothing passed
    (0 vs 0), became the default, and its verification frames recorded "no detections" as what
    a server must see before swapping it in. Such a model is almost always declared wrongly;
    the message lists how, and the check runs before any other variant is built."""
    map50 = reference.metrics["map50"]
    if map50 >= opts.min_map50:
        return
    objects = sum(1 for a in valset.gt["annotations"] if not a.get("iscrowd", 0))
    raise ModelError(
        f"{opts.onnx.name}: FP32 mAP50 {map50:.4f} on {opts.data} (images {len(valset.images)}, labelled objects "
        f"{objects}, its detections {len(reference.predictions)}) is below --min-map50 {opts.min_map50:g}: it is "
        f"most likely read wrongly. Check --layout ({opts.layout}), the colour order (--bgr / --rgb), --scale "
        f"({opts.scale:.6g}; 1 if it takes 0..255 pixels), --mean / --std (applied after --scale, so in 0..1 units "
        "with 1/255), that its boxes are pixels of its input (not normalised to 0..1), and that --classes is in "
        "the model's training order; --min-map50 0 imports it anyway")


def import_version(onnx: Path, classes: Sequence[str], pre: PreprocessSpec, post: PostprocessSpec,
                   input_shape: Sequence[int]) -> str:
    """The imported artifact's version: the ONNX file's hash, then a hash of how it is served
    (classes, preprocessing, output layout and priors, input shape). The same file imported
    again at another --input-size or with other classes is another artifact, and the server's
    degrader steps between variants of one version only."""
    contract = json.dumps({"classes": list(classes), "preprocess": dataclasses.asdict(pre),
                           "postprocess": dataclasses.asdict(post), "input_shape": list(input_shape)},
                          sort_keys=True, default=str)
    return f"imported+{sha256_file(onnx)[:8]}.{hashlib.sha256(contract.encode()).hexdigest()[:8]}"


def _stage_priors(path: Path, staging: Path, variances: tuple[float, float]) -> Priors:
    from perception.pipeline import load_priors

    arr = load_priors(path)  # validates shape and values
    dst = staging / "priors.npy"
    np.save(dst, arr)
    return Priors(dst.name, sha256_file(dst), variances)


def _measured_variants(
    opts: ImportOptions, valset: ValSet, src: Path, staging: Path, pre: PreprocessSpec, post: PostprocessSpec,
    input_shape: tuple[int, ...], max_batch: int, progress: Progress, calib: list[Path], input_name: str,
    single_image: bool = False,
) -> tuple[list[Variant], dict[str, Any]]:
    """Every precision asked for, gated on ``valset``; INT8 calibrated on ``calib`` through the
    model's own input (``input_name``: it used to be fed as "images", and INT8 was skipped for
    every model whose input is named otherwise; ``single_image``: a (3, H, W) input, fed each
    image without the batch axis, which it used to refuse)."""
    from build_engine import gate as g
    from build_engine.calibration import calibration_set_hash
    from build_engine.quantize import convert_fp16, quantize_int8

    priors = g.load_priors_of(post, staging)
    # A model recorded with max batch 1 (it runs one frame at a time) is scored one frame at a time.
    batch = min(g.EVAL_BATCH, max_batch)
    reference = g.evaluate_shown("fp32", src, valset, pre, post, opts.threads, batch, priors=priors,
                                 progress=progress)
    _check_reference(opts, reference, valset)
    files: dict[str, tuple[Path, Precision, Calibration | None]] = {"fp32": (src, Precision.FP32, None)}
    skipped: dict[str, str] = {}
    if "fp16" in opts.precisions:
        try:
            files["fp16"] = (convert_fp16(src, staging / "model.fp16.onnx"), Precision.FP16, None)
        except (ModelError, ValueError, RuntimeError) as exc:
            skipped["fp16"] = f"FP16 conversion failed: {exc}"
    if "int8" in opts.precisions:
        progress(f"calibrating INT8 ({opts.calibrator}) on {len(calib)} images through the frame pipeline")
        try:
            reader = (_SingleImageCalibrationReader if single_image else ImageCalibrationReader)(
                calib, pre, input_name=input_name)
            q = quantize_int8(src, staging / "model.int8.onnx", reader, opts.calibrator)
            files["int8"] = (q.path, Precision.INT8, Calibration(q.calibrator, calibration_set_hash(calib),
                                                                 tuple(q.excluded_nodes)))
        except (ModelError, ValueError, RuntimeError) as exc:
            skipped["int8"] = f"INT8 quantization failed: {exc}"
    for name, why in skipped.items():
        log.warning("skipping %s: %s", name, why)
    gates = GateThresholds()
    limits = {n: gates.limits("base", p) for n, (_, p, _) in files.items()}
    results = g.run_gate({n: f[0] for n, f in files.items()}, limits, valset, pre, post, opts.latency_runs,
                         opts.threads, progress=progress, priors=priors, batch_size=batch,
                         evaluated={"fp32": reference})
    out = []
    for name, (path, precision, cal) in files.items():
        r = results[name]
        out.append(Variant(name, path.name, precision, sha256_file(path), input_shape=input_shape,
                           max_batch=max_batch, parent="" if name == "fp32" else "fp32", calibration=cal,
                           metrics=r.metrics, latency_ms=r.latency_ms, parity=r.parity, gate=r.gate))
    return out, results


class _SingleImageCalibrationReader(ImageCalibrationReader):
    """Calibration images for a single-image export: (3, H, W), the batch axis taken off."""

    def get_next(self) -> dict[str, NDArray[np.float32]] | None:
        feed = super().get_next()
        return None if feed is None else {name: batch[0] for name, batch in feed.items()}


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--input-size must be WxH, e.g. 640x640, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise ConfigError(f"--input-size must be positive, got {text!r}")
    return w, h


def check_manifest_dir(path: Path) -> None:
    """Refuse to import over something that is not a previous artifact."""
    from build_engine.artifact_dir import check_out_dir

    check_out_dir(path)


__all__ = ["ImportOptions", "check_manifest_dir", "load_valset", "parse_size", "run_import"]
