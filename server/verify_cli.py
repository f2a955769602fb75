"""``perception verify-engine``: does an engine detect what its ONNX model detects, here?

Runs the reference (an ONNX variant through onnxruntime: by default the FP32 model of the
candidate's own weights family) and the candidate (a TensorRT engine, or another variant
such as int8) on the same real frames through the one frame pipeline, and compares their
DETECTIONS, not raw tensors (an INT8 or FP16 model never matches FP32 bit for bit): the share
of reference detections that vanish and of candidate detections that appear, against
tolerances that fit the candidate's precision. The largest raw-output difference is reported
for information. Exit 0 when within tolerance, 1 when not, 2 when it cannot run here (e.g.
TensorRT is not installed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from perception.errors import DataError, ModelError
from perception.manifest import Manifest, Precision, Variant, VariantFormat, load_manifest
from perception.parity import parity
from perception.pipeline import FrameInput, FramePipeline, RawPixels, RequestOptions, file_frame
from perception.types import Detections
from server.runtime.availability import tensorrt_installed
from server.runtime.base import Backend

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# The bundled drive, found from this file, not from the working directory.
BUNDLED_FRAMES = Path(__file__).resolve().parents[1] / "assets" / "drives" / "demo" / "front.mp4"
# Largest share of reference detections a candidate may lose (and of its own that may be new)
# at the deployed threshold, per precision. FP32 vs FP32 is the same arithmetic; FP16 rounds
# scores near the threshold; INT8 moves a few more. The build records each variant's measured
# parity on its val set; these defaults sit above what the shipped model measured there
# (docs/verify_engine.md).
MAX_CHANGED = {Precision.FP32: 0.01, Precision.FP16: 0.05, Precision.INT8: 0.15}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception verify-engine", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", required=True, help="manifest.json")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--engine", help="TensorRT engine file to check")
    g.add_argument("--variant", help="manifest variant to check (ONNX or TensorRT)")
    p.add_argument("--reference", help="ONNX variant to compare against (default: the FP32 model of the candidate's "
                   "own weights family, e.g. pruned_fp32 for trt_pruned_int8)")
    p.add_argument("--frames", help=f"image folder, image or video (default: the bundled drive, {BUNDLED_FRAMES.name})")
    p.add_argument("--num-frames", type=int, default=16, help="frames to compare")
    p.add_argument("--max-changed", type=float, default=None,
                   help="largest share (0..1) of detections allowed to vanish or appear "
                        f"(default by precision: {', '.join(f'{k.value} {v:g}' for k, v in MAX_CHANGED.items())})")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--json", action="store_true", help="print the report as JSON to stdout")
    return p


@dataclass(frozen=True)
class Report:
    reference: str
    candidate: str
    precision: str
    frames: int
    max_abs_diff: float  # largest raw-output difference (information only)
    detections_reference: int
    detections_candidate: int
    vanished: float  # share of reference detections the candidate lost
    appeared: float  # share of candidate detections the reference does not have
    moved: float  # matched, but below IoU 0.9
    max_changed: float
    passed: bool


def load_frames(source: str | Path, limit: int) -> list[FrameInput]:
    """Up to ``limit`` frames as the server receives them: image files' encoded bytes, or a
    video's decoded frames as raw BGR pixels."""
    import cv2

    src = Path(source)
    frames: list[FrameInput] = []
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        frames = [file_frame(f, i, "verify") for i, f in enumerate(files)]
    elif src.suffix.lower() in IMAGE_SUFFIXES and src.is_file():
        frames = [file_frame(src, 0, "verify")]
    elif src.is_file():
        cap = cv2.VideoCapture(str(src))
        while len(frames) < limit:
            ok, img = cap.read()
            if not ok:
                break
            h, w = img.shape[:2]
            raw = RawPixels(w, h, 0, 1, np.ascontiguousarray(img).tobytes())  # 1 = BGR8
            frames.append(FrameInput("verify", len(frames), 0, raw=raw))
        cap.release()
    if not frames:
        raise DataError(f"no frames found in {src} (an image folder, an image, or a video)")
    return frames


def family_fp32(m: Manifest, candidate: Variant | None) -> Variant:
    """The FP32 ONNX model of the candidate's weights family (of the default variant for a bare
    ``--engine``): a pruned model must not be judged against the unpruned one."""
    base = candidate or m.variant()
    ref = m.sibling(base, Precision.FP32)
    if ref is None:
        raise ModelError(f"manifest has no FP32 ONNX model of family {base.family!r}; pass --reference")
    return ref


def _candidate(m: Manifest, variant: str, engine: str | None, threads: int) -> tuple[Backend, str, Precision]:
    from server.runtime.factory import RuntimeSettings, backend_for

    if engine:
        from server.runtime.tensorrt_backend import TensorRTBackend

        b: Backend = TensorRTBackend(Path(engine), None, max_batch=1)
        b.activate()
        return b, Path(engine).name, m.variant().precision
    if not variant:
        raise ModelError("nothing to verify: pass --engine FILE or --variant NAME")
    v = m.variant(variant)
    preference = ("tensorrt",) if v.format is VariantFormat.TENSORRT else ("onnxruntime-cpu",)
    backend, _ = backend_for(m, v.name, RuntimeSettings(threads=threads, max_batch=1), preference)
    return backend, v.name, v.precision


def compare(m: Manifest, candidate: str, engine: str | None, reference: str | None, frames: list[FrameInput],
            max_changed: float | None, threads: int) -> Report:
    from server.runtime.factory import RuntimeSettings, backend_for

    cand_v = m.variant(candidate) if candidate else None
    ref_v = m.variant(reference) if reference else family_fp32(m, cand_v)
    ref_b, _ = backend_for(m, ref_v.name, RuntimeSettings(threads=threads, max_batch=1))
    try:
        cand_b, cand_name, precision = _candidate(m, candidate, engine, threads)
    except BaseException:
        ref_b.deactivate()
        raise
    limit = MAX_CHANGED[precision] if max_changed is None else max_changed
    pipes = [FramePipeline.from_manifest(m), FramePipeline.from_manifest(m)]
    dets: tuple[list[Detections], list[Detections]] = ([], [])
    max_diff = 0.0
    try:
        for pipe, b in zip(pipes, (ref_b, cand_b), strict=True):
            pipe.bind_outputs(b.outputs)
        for f in frames:
            prepared = pipes[0].prepare(f, RequestOptions())
            x = pipes[0].to_batch([prepared.tensor])
            outs: list[dict[str, Any]] = [ref_b.infer(x), cand_b.infer(x)]
            for k, out in enumerate(outs):
                dets[k].append(pipes[k].finish({n: a[0] for n, a in out.items()}, prepared))
            for name, a in outs[0].items():
                if name in outs[1] and np.shape(outs[1][name]) == np.shape(a):
                    d = np.abs(np.asarray(a, np.float64) - np.asarray(outs[1][name], np.float64))
                    max_diff = max(max_diff, float(d.max()) if d.size else 0.0)
    finally:
        ref_b.deactivate()
        cand_b.deactivate()
    par = parity(dets[0], dets[1])
    passed = par["vanished"] <= limit and par["appeared"] <= limit
    return Report(ref_v.name, cand_name, precision.value, len(frames), max_diff, int(par["reference_detections"]),
                  int(par["variant_detections"]), par["vanished"], par["appeared"], par["moved"], limit, passed)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    m = load_manifest(args.model)
    wants_trt = bool(args.engine) or (bool(args.variant) and m.variant(args.variant).format is VariantFormat.TENSORRT)
    if wants_trt and not tensorrt_installed():
        print("perception verify-engine: error: TensorRT is not installed on this machine; run this on the device "
              "(or compare two ONNX variants with --variant)", file=sys.stderr)
        return 2
    if args.frames is None and not BUNDLED_FRAMES.is_file():
        raise DataError(f"the bundled drive {BUNDLED_FRAMES} is not here (an installed package?); pass --frames")
    frames = load_frames(args.frames or BUNDLED_FRAMES, args.num_frames)
    rep = compare(m, args.variant or "", args.engine, args.reference, frames, args.max_changed, args.threads)
    if args.json:
        print(json.dumps(asdict(rep), indent=2))
    else:
        print(f"{rep.candidate} ({rep.precision}) vs {rep.reference} on {rep.frames} frames: detections "
              f"{rep.detections_candidate} vs {rep.detections_reference}; vanished {rep.vanished:.1%}, appeared "
              f"{rep.appeared:.1%} (limit {rep.max_changed:.0%}), moved {rep.moved:.1%}; max raw |diff| "
              f"{rep.max_abs_diff:.3g} -> {'PASS' if rep.passed else 'FAIL'}")
    return 0 if rep.passed else 1
