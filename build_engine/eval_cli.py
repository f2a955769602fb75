"""``perception eval``: score COCO results, a checkpoint or an ONNX file against ground truth.

  perception eval --gt GT.json --pred RESULTS.json [--json] [--out DIR]
  perception eval --checkpoint CKPT --data DIR [--json] [--out DIR]
  perception eval --onnx MODEL.onnx --data DIR [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json

from perception.cli import add_progress_flag, show_progress


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception eval", description="Precision, recall, PR curve, AP50, mAP50-95.")
    p.add_argument("--gt", help="COCO ground-truth JSON")
    p.add_argument("--pred", help="COCO results JSON (list of {image_id, category_id, bbox, score})")
    p.add_argument("--checkpoint", help="score a PyTorch checkpoint on --data")
    p.add_argument("--onnx", help="score an ONNX model on --data (runs the serving pre/post-processing)")
    p.add_argument("--data", help="labelled dataset directory (COCO annotations.json or YOLO labels/)")
    p.add_argument("--score-threshold", type=float, default=0.25,
                   help="deployed threshold for P / R / F1 (default 0.25)")
    p.add_argument("--out", help="write kpi.json, results.json and PNG plots here")
    p.add_argument("--json", action="store_true", help="print the KPI JSON (no curves) instead of a table")
    add_progress_flag(p)
    return p


def format_table(d: dict) -> str:
    lines = [
        f"mAP50-95 {d['map50_95']:.4f}  mAP50 {d['map50']:.4f}  mAP75 {d['map75']:.4f}",
        f"at score >= {d['score_threshold']:.2f}: precision {d['precision']:.4f}  recall {d['recall']:.4f}  "
        f"F1 {d['f1']:.4f}  (best F1 at {d['best_f1_threshold']:.2f})",
        f"images {d['num_images']}  ground truths {d['num_gt']}  detections {d['num_dets']}",
        "",
        f"{'class':<14} {'n_gt':>6} {'AP50':>7} {'AP50-95':>8} {'P':>7} {'R':>7}",
    ]
    for name, c in d["per_class"].items():
        lines.append(f"{name:<14} {c['num_gt']:>6} {c['ap50']:>7.4f} {c['ap50_95']:>8.4f} "
                     f"{c['precision']:>7.4f} {c['recall']:>7.4f}")
    lines.append("")
    for size, s in d["per_size"].items():
        if s["map50"] < 0:  # COCO's -1: no ground truth of this size
            lines.append(f"{size:<8} no ground truth of this size")
        else:
            lines.append(f"{size:<8} mAP50-95 {s['map50_95']:.4f}  mAP50 {s['map50']:.4f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from perception.errors import ConfigError

    preds = None
    if args.gt or args.pred:
        if not (args.gt and args.pred) or args.checkpoint or args.onnx:
            raise ConfigError("--gt and --pred go together (and not with --checkpoint / --onnx)")
        from perception.coco import load_coco, load_results
        from perception.kpi import evaluate_coco

        gt = load_coco(args.gt)
        preds = load_results(args.pred, gt)
        report = evaluate_coco(gt, preds, args.score_threshold)
    elif args.checkpoint or args.onnx:
        if not args.data or (args.checkpoint and args.onnx):
            raise ConfigError("give exactly one of --checkpoint / --onnx, with --data DIR")
        from build_engine.evaluate import evaluate_checkpoint, evaluate_onnx

        fn = evaluate_checkpoint if args.checkpoint else evaluate_onnx
        report, preds, _ = fn(args.checkpoint or args.onnx, args.data, args.score_threshold,
                              progress=show_progress(args.no_progress))
    else:
        raise ConfigError("nothing to evaluate: give --gt/--pred, --checkpoint/--data or --onnx/--data")
    if args.out:
        from build_engine.evaluate import write_report

        write_report(args.out, report, preds if not args.gt else None)
    d = report.to_dict(curves=False)
    print(json.dumps(d, indent=1) if args.json else format_table(d))
    return 0
