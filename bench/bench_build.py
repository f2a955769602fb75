"""Build-stage compression, side by side in one run: INT8 vs FP32 and pruned vs unpruned,
latency ratio and mAP50-95 drop, against the issue's targets. Not a test: latency depends on
the machine's load (all variants are timed round-robin so load hits them alike; compare ratios).

  .venv/bin/python -m bench.bench_build [--checkpoint CKPT] [--pruned CKPT | --prune-here
      [--prune-ratio R] [--remove-blocks B] [--finetune-epochs E]] [--val-images N] [--runs N]
      [--threads T] [--json OUT]

The pruned model defaults to the shipped one (models/default/detector_pruned.pt, made by
scripts/train_default.sh with `perception prune`); --prune-here makes a fresh one instead
with the script's first pass only (10 distilled fine-tune epochs, about 21 minutes on 2 cores;
the shipped model had 35 more, and a single pass leaves it about 3.6 points below).

Targets: INT8 latency <= 0.55x FP32 with mAP50-95 drop <= 1.0 point; pruned latency <= 0.6x
the unpruned model with drop <= 1.5 points.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from perception.manifest import Manifest

TARGETS = {"int8": (0.55, 1.0), "pruned_fp32": (0.60, 1.5), "pruned_int8": (0.60, 1.5)}


class CompressionRow(TypedDict):
    """One variant against its base: latency and MAC ratios, mAP drop and the target's verdict."""

    variant: str
    vs: str
    latency_ratio_p50: float
    latency_ratio_min: float
    map50_95_drop_points: float
    macs_ratio: float
    p50_ms: float
    min_ms: float
    base_p50_ms: float
    base_min_ms: float
    map50_95: float
    target: tuple[float, float] | None
    verdict_p50: str
    verdict_min: str


class CalibratorRow(TypedDict):
    """INT8 with one calibrator: mAP50-95 (points), its drop vs FP32 and parity shares."""

    calibrator: str
    map50_95: float
    drop_points: float
    vanished: float
    moved: float
    appeared: float


def verdict(ratio: float, drop: float, target: tuple[float, float] | None) -> str:
    """``MET`` if both the latency ratio and the mAP drop are within ``target``, ``-`` without one."""
    if target is None:
        return "-"
    return "MET" if ratio <= target[0] and drop <= target[1] else "MISSED"


def make_pruned(checkpoint: Path, out: Path, ratio: float, blocks: int, epochs: int, images: int) -> Path:
    """Prune (and optionally fine-tune) ``checkpoint`` exactly as ``perception prune`` does."""
    from build_engine.prune_cli import main as prune_main

    argv = ["--checkpoint", str(checkpoint), "--ratio", str(ratio), "--remove-blocks", str(blocks), "--out", str(out),
            "--finetune-epochs", str(epochs), "--finetune-images", str(images), "--no-progress"]
    if prune_main(argv) != 0:
        raise SystemExit("pruning failed")
    return out


def compare_calibrators(m: Manifest, a: argparse.Namespace) -> list[CalibratorRow]:
    """INT8 of the built FP32 model with each calibrator, on the same val / calibration sets."""
    from build_engine.build import BuildOptions, _prepare_data
    from build_engine.calibration import ImageCalibrationReader
    from build_engine.gate import ValSet, evaluate_variant, parity
    from build_engine.quantize import quantize_int8

    out: list[CalibratorRow] = []
    fp32 = m.path_of(m.variant("fp32"))
    with tempfile.TemporaryDirectory(prefix="bench_calib_") as tmp:
        opts = BuildOptions(out_dir=Path(tmp) / "unused", val_images=a.val_images, calib_images=a.calib_images)
        val_dir, calib, _ = _prepare_data(opts, Path(tmp), lambda msg: None)
        vs = ValSet.load(val_dir, limit=a.val_images)
        ref = evaluate_variant("fp32", fp32, vs, m.preprocess, m.postprocess, threads=a.threads)
        for cal in ("minmax", "percentile", "entropy"):
            print(f"[bench] calibrator {cal}", file=sys.stderr, flush=True)
            q = quantize_int8(fp32, Path(tmp) / f"{cal}.onnx", ImageCalibrationReader(calib, m.preprocess), cal)
            ev = evaluate_variant(cal, q.path, vs, m.preprocess, m.postprocess, threads=a.threads)
            par = parity(ref.detections, ev.detections)
            out.append({"calibrator": cal, "map50_95": 100 * ev.metrics["map50_95"],
                        "drop_points": 100 * (ref.metrics["map50_95"] - ev.metrics["map50_95"]),
                        "vanished": par["vanished"], "moved": par["moved"], "appeared": par["appeared"]})
    return out


def main(argv: list[str] | None = None) -> int:
    from build_engine.build import DEFAULT_CHECKPOINT, BuildOptions, run_build
    from perception.manifest import load_manifest

    DEFAULT_PRUNED = DEFAULT_CHECKPOINT.with_name("detector_pruned.pt")  # noqa: N806

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--pruned", type=Path, default=DEFAULT_PRUNED, help="a pruned checkpoint (default: %(default)s)")
    p.add_argument("--prune-here", action="store_true", help="prune --checkpoint here instead of using --pruned")
    # The first pass of scripts/train_default.sh's recipe. Structured pruning is prune-then-fine-tune:
    # unrecovered, even a light prune loses most of the mAP, so a bench without fine-tuning
    # measures nothing.
    p.add_argument("--prune-ratio", type=float, default=0.2)
    p.add_argument("--remove-blocks", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=10,
                   help="fine-tuning epochs after pruning (default: %(default)s)")
    p.add_argument("--finetune-images", type=int, default=0, help="train images per fine-tune epoch (default: all)")
    p.add_argument("--calibrator", default="minmax", choices=("minmax", "percentile", "entropy"))
    p.add_argument("--val-images", type=int, default=300, help="the training run's whole val split by default")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--runs", type=int, default=100, help="timed batch-1 runs per variant, round-robin")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1: least noisy here)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--compare-calibrators", action="store_true", help="also quantize with minmax, percentile and "
                   "entropy and compare their mAP and parity")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_build_") as tmp:
        if a.prune_here or not a.pruned.is_file():
            pruned = make_pruned(a.checkpoint, Path(tmp) / "pruned.pt", a.prune_ratio, a.remove_blocks,
                                 a.finetune_epochs, a.finetune_images)
        else:
            pruned = a.pruned
        opts = BuildOptions(
            out_dir=Path(tmp) / "art", checkpoint=a.checkpoint, pruned=(pruned,), calibrator=a.calibrator,
            val_images=a.val_images, calib_images=a.calib_images, latency_runs=a.runs, threads=a.threads,
            continue_on_fail=True, report=False, scaling=False,
        )
        manifest_path, _ = run_build(opts, lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
        m = load_manifest(manifest_path)
        calib_rows = compare_calibrators(m, a) if a.compare_calibrators else []
    v = {x.name: x for x in m.variants}
    rows: list[CompressionRow] = []
    for name, base in (("fp16", "fp32"), ("int8", "fp32"), ("pruned_fp32", "fp32"), ("pruned_int8", "int8")):
        if name not in v:
            continue
        lat, lat0 = v[name].latency_ms, v[base].latency_ms
        r50, rmin = lat["p50"] / lat0["p50"], lat["min"] / lat0["min"]
        drop = 100 * (v[base].metrics["map50_95"] - v[name].metrics["map50_95"])
        target = TARGETS.get(name)
        rows.append({
            "variant": name, "vs": base, "latency_ratio_p50": round(r50, 3), "latency_ratio_min": round(rmin, 3),
            "map50_95_drop_points": round(drop, 3), "macs_ratio": round(v[name].macs / v[base].macs, 3),
            "p50_ms": round(lat["p50"], 3), "min_ms": round(lat["min"], 3), "base_p50_ms": round(lat0["p50"], 3),
            "base_min_ms": round(lat0["min"], 3), "map50_95": round(100 * v[name].metrics["map50_95"], 2),
            "target": target, "verdict_p50": verdict(r50, drop, target), "verdict_min": verdict(rmin, drop, target),
        })
    f = v["fp32"]
    print(f"fp32: mAP50-95 {100 * f.metrics['map50_95']:.2f}, latency p50 {f.latency_ms['p50']:.2f} ms / min "
          f"{f.latency_ms['min']:.2f} ms, {f.macs / 1e6:.1f} M MACs; {a.runs} round-robin runs, {a.threads} thread(s), "
          f"{a.val_images} val images")
    print(f"{'variant':<12} {'vs':<5} {'p50':>6} {'min':>6} {'MACs':>6} {'mAP drop':>9}  {'target':<20} "
          "verdict (p50 / min)")
    for r in rows:
        t = f"<= {r['target'][0]:.2f}x, <= {r['target'][1]:.1f}" if r["target"] else ""
        print(f"{r['variant']:<12} {r['vs']:<5} {r['latency_ratio_p50']:>5.2f}x {r['latency_ratio_min']:>5.2f}x "
              f"{r['macs_ratio']:>5.2f}x {r['map50_95_drop_points']:>+8.2f}  {t:<20} "
              f"{r['verdict_p50']} / {r['verdict_min']}")
    print("(p50 swings with other jobs on this shared machine; min is the least-disturbed run)")
    if calib_rows:
        print(f"\n{'calibrator':<11} {'mAP50-95':>9} {'drop':>7} {'vanished':>9} {'moved':>7} {'appeared':>9}")
        for c in calib_rows:
            print(f"{c['calibrator']:<11} {c['map50_95']:>9.2f} {c['drop_points']:>+7.2f} {100 * c['vanished']:>8.2f}% "
                  f"{100 * c['moved']:>6.2f}% {100 * c['appeared']:>8.2f}%")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "calibrators": calib_rows, "fp32": {
            "p50_ms": v["fp32"].latency_ms["p50"], "min_ms": v["fp32"].latency_ms["min"],
            "map50_95": v["fp32"].metrics["map50_95"]}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
