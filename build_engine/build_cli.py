"""``perception build``: fold BN, export ONNX, quantize, build engines, gate, write the manifest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from build_engine.build import DEFAULT_CHECKPOINT, BuildOptions, GateThresholds
from perception.cli import add_progress_flag, show_progress
from perception.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perception build",
        description="Turn a trained checkpoint into gated deployable variants: DIR/manifest.json, "
        "model.*.onnx, report.md and plots/.",
    )
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write (replaced atomically)")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help="trained checkpoint (default: %(default)s)")
    p.add_argument("--pruned", type=Path, action="append", default=[],
                   help="a pruned checkpoint to add as variants (repeatable)")
    p.add_argument("--precisions", default="fp32,fp16,int8",
                   help="comma list among fp32,fp16,int8 (default: %(default)s)")
    p.add_argument("--calibrator", default="minmax", choices=("minmax", "percentile", "entropy"),
                   help="INT8 activation calibrator")
    p.add_argument("--tensorrt-calibrator", default="percentile", choices=("minmax", "percentile", "entropy"),
                   help="calibrator of the TensorRT INT8 Q/DQ models (signed, symmetric; default: %(default)s)")
    p.add_argument("--no-tensorrt-qdq", action="store_true",
                   help="skip the TensorRT INT8 Q/DQ models (a device could then build only FP16 engines)")
    p.add_argument("--calib-images", type=int, default=48, help="calibration images (default: %(default)s)")
    p.add_argument("--val-images", type=int, default=300,
                   help="val images for the gate (default: %(default)s, the training run's whole val split)")
    p.add_argument("--data", type=Path, default=None,
                   help="dataset dir (annotations.json + images/) used as the val set (INT8 never calibrates on "
                   "val images: it calibrates on --calib-data, else on generated, seeded images). "
                   "Default: generated, seeded")
    p.add_argument("--calib-data", type=Path, default=None, help="directory of calibration images")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated val / calibration sets")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset of the exported models (default 17)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the engines accept")
    p.add_argument("--nms-in-graph", action="store_true",
                   help="also write model.fp32.nms.onnx with ONNX NonMaxSuppression (YOLO-style family only)")
    p.add_argument("--gate-fp16", type=float, default=0.2, help="max mAP50-95 drop in points (default: %(default)s)")
    p.add_argument("--gate-int8", type=float, default=1.0, help="max mAP50-95 drop in points (default: %(default)s)")
    p.add_argument("--gate-pruned", type=float, default=1.5, help="max mAP50-95 drop in points (default: %(default)s)")
    p.add_argument("--gate-fp16-latency", type=float, default=1.5,
                   help="max min-latency ratio vs fp32 (default: %(default)s; "
                   "FP16 is kept for GPU devices, often not faster on a CPU)")
    p.add_argument("--gate-int8-latency", type=float, default=1.0,
                   help="max min-latency ratio vs fp32 (default: %(default)s)")
    p.add_argument("--gate-pruned-latency", type=float, default=1.0,
                   help="max min-latency ratio vs fp32 (default: %(default)s)")
    p.add_argument("--latency-budget-ms", type=float, default=None,
                   help="max p95 batch-1 latency of every variant, ms (default: none)")
    p.add_argument("--continue-on-fail", action="store_true", help="exit 0 even when a variant fails its gate")
    p.add_argument("--latency-runs", type=int, default=30, help="timed batch-1 runs per variant")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--no-report", action="store_true", help="skip report.md and plots/")
    p.add_argument("--no-scaling", action="store_true", help="skip the report's scaling table (~11 extra models)")
    p.add_argument("--scaling-val-images", type=int, default=32, help="val images for the scaling table's mAP")
    p.add_argument("--input-size", metavar="WxH",
                   help="export at this input size instead of the checkpoint's (multiples of 32; YOLO-style family "
                        "only): the same weights see far, small objects at a larger input, at more MACs")
    p.add_argument("--name", default="", help="model name in the manifest (default: the checkpoint's directory)")
    add_progress_flag(p)
    return p


def _size(text: str | None) -> tuple[int, int] | None:
    """"1024x576" -> (1024, 576); ConfigError for anything else."""
    if text is None:
        return None
    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit()):
        raise ConfigError(f"--input-size wants WIDTHxHEIGHT (e.g. 1024x576), got {text!r}")
    return int(w), int(h)


def gate_thresholds(args: argparse.Namespace) -> GateThresholds:
    """The gates the command line asks for (validated by GateThresholds)."""
    return GateThresholds(
        fp16=args.gate_fp16,
        int8=args.gate_int8,
        pruned=args.gate_pruned,
        fp16_max_latency_ratio=args.gate_fp16_latency,
        int8_max_latency_ratio=args.gate_int8_latency,
        pruned_max_latency_ratio=args.gate_pruned_latency,
        latency_budget_ms=args.latency_budget_ms,
    )


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import logging

    from build_engine.artifact_dir import check_out_dir
    from build_engine.build import run_build

    check_out_dir(args.out)  # before minutes of work: --out models/default would have been replaced

    # One "[build] ..." line per step is the progress output; per-session load logs are noise.
    for noisy in ("server.runtime", "build_engine.export", "build_engine.data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    opts = BuildOptions(
        out_dir=args.out,
        checkpoint=args.checkpoint,
        pruned=tuple(args.pruned),
        precisions=tuple(s.strip() for s in args.precisions.split(",") if s.strip()),
        calibrator=args.calibrator,
        tensorrt_calibrator=args.tensorrt_calibrator,
        tensorrt_qdq=not args.no_tensorrt_qdq,
        calib_images=args.calib_images,
        val_images=args.val_images,
        data_dir=args.data,
        calib_dir=args.calib_data,
        seed=args.seed,
        opset=args.opset,
        max_batch=args.max_batch,
        nms_in_graph=args.nms_in_graph,
        gates=gate_thresholds(args),
        continue_on_fail=args.continue_on_fail,
        latency_runs=args.latency_runs,
        threads=args.threads,
        report=not args.no_report,
        scaling=not args.no_scaling,
        scaling_val_images=args.scaling_val_images,
        name=args.name,
        input_size=_size(args.input_size),
    )

    shown = show_progress(args.no_progress)

    def progress(msg: str) -> None:
        if shown:
            print(f"[build] {msg}", file=sys.stderr, flush=True)

    manifest_path, _ = run_build(opts, progress)
    print(manifest_path)
    from perception.manifest import load_manifest

    manifest = load_manifest(manifest_path, verify_checksums=False)
    failed = [v for v in manifest.variants if not v.passed]
    if failed:
        print("perception build: warning: these variants failed their gate (one is served by default only if "
              "none passed): "
              + "; ".join(f"{v.name} ({v.gate.get('reason', '')})" for v in failed), file=sys.stderr)
    # Fail only when nothing servable passed: a failed optional variant (say the pruned FP16 one
    # on a noisy machine) must not abort a build whose default variant is fine.
    if not manifest.variant().passed:
        print("perception build: error: no variant passed its gate (see the manifest and report.md)", file=sys.stderr)
        return 0 if args.continue_on_fail else 3
    return 0
