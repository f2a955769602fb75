"""``perception train --config FILE [--set key=value ...] --out DIR [--resume]``."""

from __future__ import annotations

import argparse
import json
import logging

from perception.cli import add_progress_flag, show_progress

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception train", description="Train a detector from a config file.")
    p.add_argument("--config", help="train config YAML (e.g. configs/default.yaml); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.epochs=5 (repeatable)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, train_log.jsonl")
    p.add_argument("--data", help="dataset root with train/ and val/ (COCO or YOLO); default: generated")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    add_progress_flag(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from build_engine.config import load_config
    from build_engine.train.trainer import train

    overrides = list(args.overrides)
    if args.data:
        overrides += [f"data.train_dir={args.data}/train", f"data.val_dir={args.data}/val"]
    cfg = load_config(args.config, overrides)
    result = train(cfg, args.out, resume=args.resume, progress=show_progress(args.no_progress))
    print(json.dumps({"best_checkpoint": str(result.best_checkpoint), "best": result.best_kpi,
                      "epochs_run": result.epochs_run, "seconds": round(result.seconds, 1)}))
    return 0
