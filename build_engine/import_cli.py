"""``perception import``: serve, compress and score a detector trained elsewhere."""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

from perception.cli import add_progress_flag, show_progress
from perception.errors import ConfigError
from perception.layouts import DECODERS


def _scale(text: str) -> float:
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 1/255, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"scale must be positive, got {text!r}")
    return value


def _triple(text: str) -> tuple[float, float, float]:
    parts = [float(v) for v in text.replace(",", " ").split()]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers (one per channel), got {text!r}")
    return parts[0], parts[1], parts[2]


def _role(text: str) -> tuple[str, str]:
    role, sep, name = text.partition("=")
    if not sep or not role or not name:
        raise argparse.ArgumentTypeError(f"expected ROLE=OUTPUT_NAME, got {text!r}")
    return role, name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perception import",
        description="Write DIR/manifest.json for an ONNX detector trained elsewhere; with --data, also build, "
        "score and gate its FP16 and INT8 variants like `perception build` does.",
    )
    p.add_argument("--onnx", required=True, type=Path, help="the ONNX model file")
    p.add_argument("--layout", required=True, choices=sorted(DECODERS),
                   help="how its outputs are laid out (docs/output_layouts.md)")
    p.add_argument("--classes", required=True, type=Path, help="class names, one per line, in the model's order")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write (replaced atomically)")
    p.add_argument("--input-size", help="WxH, required when the model's input size is dynamic")
    p.add_argument("--data", type=Path, default=None,
                   help="labelled images: a COCO JSON file, or a COCO (annotations.json) or YOLO (classes.txt + "
                        "labels/) folder; calibrates INT8 and scores every variant. Without it nothing is measured")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--rgb", dest="color_order", action="store_const", const="RGB",
                       help="the model takes RGB (default)")
    order.add_argument("--bgr", dest="color_order", action="store_const", const="BGR", help="the model takes BGR")
    p.set_defaults(color_order="RGB", letterbox=True)
    p.add_argument("--scale", type=_scale, default=1 / 255, help="pixel scale before mean/std (default 1/255)")
    p.add_argument("--mean", type=_triple, default=(0.0, 0.0, 0.0), help="per-channel mean, after scaling")
    p.add_argument("--std", type=_triple, default=(1.0, 1.0, 1.0), help="per-channel std, after scaling")
    fit = p.add_mutually_exclusive_group()
    fit.add_argument("--letterbox", dest="letterbox", action="store_true",
                     help="keep the aspect ratio and pad (default)")
    fit.add_argument("--resize", dest="letterbox", action="store_false", help="stretch to the input size")
    p.add_argument("--pad-value", type=int, default=114,
                   help="the letterbox's padding grey, 0..255 (default 114, as YOLO exports pad); the image is "
                   "centred, padding split evenly on both sides")
    p.add_argument("--map", dest="outputs", type=_role, action="append", default=[],
                   help="bind a layout role to an output name, e.g. --map boxes=bbox_out (repeatable)")
    p.add_argument("--priors", type=Path, help="ssd only: a .npy of (N, 4) prior boxes cx cy w h (0..1) when the "
                   "boxes output is raw offsets")
    p.add_argument("--variances", type=float, nargs=2, default=(0.1, 0.2), help="ssd priors' variances")
    p.add_argument("--class-offset", type=int, default=0, choices=(0, 1),
                   help="nms_detections: 1 when the model's class 0 is the background (torchvision-style)")
    p.add_argument("--score-threshold", type=float, default=0.25, help="default score threshold")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="default NMS IoU threshold")
    p.add_argument("--max-detections", type=int, default=100, help="default max detections per frame")
    p.add_argument("--precisions", default="fp32,fp16,int8", help="with --data: variants to build (comma list)")
    p.add_argument("--calib-images", type=int, default=48,
                   help="with --data: calibration images, taken after the --val-images scored ones (when the data "
                   "has no more images, the scored ones calibrate too, with a warning)")
    p.add_argument("--val-images", type=int, default=300, help="with --data: images scored")
    p.add_argument("--latency-runs", type=int, default=30, help="with --data: timed batch-1 runs per variant")
    p.add_argument("--min-map50", type=float, default=0.01,
                   help="with --data: the least mAP50 (0..1) the FP32 model must reach on it, else the import fails "
                   "(a model that finds nothing is almost always declared wrongly); default 0.01, 0 turns it off")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--name", default="", help="model name in the manifest (default: the file's stem)")
    add_progress_flag(p)
    return p


def main(argv: list[str]) -> int:
    from build_engine.importer import ImportOptions, check_manifest_dir, parse_size, run_import

    args = build_parser().parse_args(argv)
    precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    if "fp32" not in precisions or not set(precisions) <= {"fp32", "fp16", "int8"}:
        raise ConfigError(f"--precisions must include fp32 and only fp32/fp16/int8, got {args.precisions!r}")
    check_manifest_dir(args.out)
    opts = ImportOptions(
        onnx=args.onnx, layout=args.layout, classes=args.classes, out=args.out,
        input_size=parse_size(args.input_size) if args.input_size else None, data=args.data,
        color_order=args.color_order, scale=args.scale, mean=args.mean, std=args.std, letterbox=args.letterbox,
        pad_value=args.pad_value,
        outputs=dict(args.outputs), priors=args.priors, variances=tuple(args.variances),
        class_offset=args.class_offset, score_threshold=args.score_threshold, iou_threshold=args.iou_threshold,
        max_detections=args.max_detections, precisions=precisions, calib_images=args.calib_images,
        val_images=args.val_images, latency_runs=args.latency_runs, threads=args.threads, name=args.name,
        min_map50=args.min_map50,
    )

    shown = show_progress(args.no_progress)

    def progress(msg: str) -> None:
        if shown:
            print(f"[import] {msg}", file=sys.stderr, flush=True)

    manifest = run_import(opts, progress)
    print(manifest)
    if args.data is None:
        print("perception import: warning: imported without --data: nothing was measured (no accuracy, latency or "
              "parity); pass --data to build, score and gate FP16 / INT8 variants", file=sys.stderr)
    return 0
