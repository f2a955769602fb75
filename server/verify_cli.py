"""``perception verify-engine``: does an engine compute what the ONNX model computes, here?

Runs the reference (an ONNX variant, fp32 by default, through onnxruntime) and the candidate
(a TensorRT engine, or another ONNX variant such as int8) on the same real frames through the
same pre/post-processing, and reports the largest raw-output difference and detection parity
(the share of reference detections found by the candidate, same class, IoU >= 0.5, and vice
versa). Exit 0 when both are within tolerance, 1 when not, 2 when it cannot run here (e.g.
TensorRT is not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from perception.errors import DataError, ModelError

if TYPE_CHECKING:
    from perception.manifest import Manifest, Variant

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_FRAMES = Path("assets/drives/demo/front.mp4")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception verify-engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="manifest.json")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--engine", help="TensorRT engine file to check")
    g.add_argument("--variant", help="manifest variant to check (ONNX or TensorRT)")
    p.add_argument("--reference", help="ONNX variant to compare against (default: the candidate's own FP32 model, "
                   "e.g. pruned_fp32 for trt_pruned_int8)")
    p.add_argument("--frames", help=f"image folder, image or video (default {DEFAULT_FRAMES})")
    p.add_argument("--num-frames", type=int, default=16, help="frames to compare")
    p.add_argument("--atol", type=float, default=1e-3, help="absolute tolerance on raw outputs")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance on raw outputs")
    p.add_argument("--min-parity", type=float, default=0.95, help="required detection parity (0..1)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


@dataclass(frozen=True)
class Report:
    reference: str
    candidate: str
    frames: int
    max_abs_diff: float
    mean_abs_diff: float
    outputs_close: bool
    detections_reference: int
    detections_candidate: int
    parity_recall: float  # reference detections the candidate also found
    parity_precision: float  # candidate detections the reference also has
    passed: bool


def load_frames(source: str | Path, limit: int) -> list[NDArray[np.uint8]]:
    """Up to ``limit`` BGR frames from an image folder, one image, or a video file."""
    import cv2

    src = Path(source)
    frames: list[NDArray[np.uint8]] = []
    if src.is_dir():
        for f in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]:
            img = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if img is None:
                raise DataError(f"{f}: cannot be decoded")
            frames.append(img)
    elif src.suffix.lower() in IMAGE_SUFFIXES:
        img = cv2.imread(str(src), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{src}: cannot be decoded")
        frames.append(img)
    elif src.is_file():
        cap = cv2.VideoCapture(str(src))
        while len(frames) < limit:
            ok, img = cap.read()
            if not ok:
                break
            frames.append(img)
        cap.release()
    if not frames:
        raise DataError(f"no frames found in {src}")
    return frames


def detection_parity(ref_boxes: list, ref_cls: list, cand_boxes: list, cand_cls: list, iou: float = 0.5) -> int:
    """How many pairs match one-to-one (same class, IoU >= ``iou``), greedily by IoU."""
    from perception.boxes import box_iou

    if not len(ref_boxes) or not len(cand_boxes):
        return 0
    m = box_iou(np.asarray(ref_boxes), np.asarray(cand_boxes))
    m[np.asarray(ref_cls)[:, None] != np.asarray(cand_cls)[None, :]] = 0.0
    matched = 0
    while True:
        i, j = np.unravel_index(int(np.argmax(m)), m.shape)
        if m[i, j] < iou:
            return matched
        matched += 1
        m[i, :] = 0.0
        m[:, j] = 0.0


def family_fp32(m: Manifest, candidate: Variant | None) -> Variant:
    """The FP32 ONNX model a candidate derives from: ``pruned_fp32`` for ``trt_pruned_int8``,
    ``fp32`` for ``int8``; for a bare ``--engine``, that of the manifest's default variant (the
    one a device builds its engine of). A pruned model must not be judged against the unpruned one."""
    from server.runtime.factory import onnx_variant

    base = (candidate.name if candidate else m.default_variant).removeprefix("trt_")
    family = base.rsplit("_", 1)[0] + "_" if "_" in base else ""
    for v in m.variants:
        if v.name == f"{family}fp32" and v.format == "onnx":
            return v
    return next((v for v in m.variants if v.format == "onnx" and v.precision == "fp32"), onnx_variant(m))


def compare(manifest_path: str, candidate: str, engine: str | None, reference: str | None,
            frames: list[NDArray[np.uint8]], atol: float, rtol: float, min_parity: float, threads: int) -> Report:
    from perception.manifest import load_manifest
    from perception.postprocess import PostprocessOptions
    from perception.preprocess import preprocess
    from server.runtime.factory import onnx_variant
    from server.runtime.onnxruntime_backend import OnnxRuntimeBackend

    m = load_manifest(manifest_path)
    cand_v = m.variant(candidate) if candidate else None
    ref_v = m.variant(reference) if reference else family_fp32(m, cand_v)
    ref_b = OnnxRuntimeBackend(m.path_of(ref_v), intra_op_threads=threads, max_batch=1)
    if engine or (cand_v is not None and cand_v.format == "tensorrt"):
        from server.runtime.factory import engine_source_sha
        from server.runtime.fingerprint import device_fingerprint
        from server.runtime.tensorrt_backend import TensorRTBackend

        path = Path(engine) if engine else m.path_of(cand_v)  # type: ignore[arg-type]
        source = onnx_variant(m, cand_v.name if cand_v else "")
        precision = cand_v.precision if cand_v else "fp16"
        want = None if engine else device_fingerprint(precision, engine_source_sha(m, cand_v, source), 1)  # type: ignore[arg-type]
        cand_b = TensorRTBackend(path, want, max_batch=1)
        cand_name = str(path.name)
    else:
        if cand_v is None:
            raise ModelError("nothing to verify: pass --engine FILE or --variant NAME")
        cand_b = OnnxRuntimeBackend(m.path_of(cand_v), intra_op_threads=threads, max_batch=1)
        cand_name = cand_v.name
    ref_b.activate()
    cand_b.activate()
    opts = PostprocessOptions.from_spec(m.postprocess)
    from perception.postprocess import postprocess

    max_diff = 0.0
    diffs: list[float] = []
    close = True
    n_ref = n_cand = matched = 0
    for img in frames:
        x, lb = preprocess(img, m.preprocess)
        a = ref_b.infer(x[None])[0]
        b = cand_b.infer(x[None])[0]
        if a.shape != b.shape:
            raise ModelError(f"output shapes differ: reference {a.shape}, candidate {b.shape}")
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        max_diff = max(max_diff, float(d.max()))
        diffs.append(float(d.mean()))
        close &= bool(np.allclose(b, a, atol=atol, rtol=rtol))
        da, db = postprocess(a, lb, opts), postprocess(b, lb, opts)
        n_ref += len(da)
        n_cand += len(db)
        matched += detection_parity(da.boxes, da.class_ids.tolist(), db.boxes, db.class_ids.tolist())
    ref_b.deactivate()
    cand_b.deactivate()
    recall = matched / n_ref if n_ref else 1.0
    precision = matched / n_cand if n_cand else 1.0
    passed = close and min(recall, precision) >= min_parity
    return Report(ref_v.name, cand_name, len(frames), max_diff, float(np.mean(diffs)), close,
                  n_ref, n_cand, recall, precision, passed)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    wants_trt = bool(args.engine)
    if not wants_trt and args.variant:
        from perception.manifest import load_manifest

        wants_trt = load_manifest(args.model, verify_checksums=False).variant(args.variant).format == "tensorrt"
    if wants_trt and importlib.util.find_spec("tensorrt") is None:
        print("perception verify-engine: TensorRT is not installed on this machine; run this on the device "
              "(or compare two ONNX variants with --variant)", file=sys.stderr)
        return 2
    frames_src = args.frames or DEFAULT_FRAMES
    frames = load_frames(frames_src, args.num_frames)
    rep = compare(args.model, args.variant or "", args.engine, args.reference, frames,
                  args.atol, args.rtol, args.min_parity, args.threads)
    if args.json:
        print(json.dumps(asdict(rep), indent=2))
    else:
        print(f"{rep.candidate} vs {rep.reference} on {rep.frames} frames: max |diff| {rep.max_abs_diff:.3g} "
              f"(mean {rep.mean_abs_diff:.3g}, within atol {args.atol:g} / rtol {args.rtol:g}: "
              f"{'yes' if rep.outputs_close else 'no'}); detections {rep.detections_candidate} vs "
              f"{rep.detections_reference}, parity recall {rep.parity_recall:.3f} precision "
              f"{rep.parity_precision:.3f} -> {'PASS' if rep.passed else 'FAIL'}")
    return 0 if rep.passed else 1
