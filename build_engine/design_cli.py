"""``perception design --out DIR``: the design table (families x activations x scaling).

Trains the short-schedule rows it needs (cached under ``DIR/runs``), then exports, quantizes,
scores and times every row and writes ``DIR/design.json``, ``DIR/design.md`` and
``DIR/design.png``. ``--train-only`` with ``--rows`` lets two rows train side by side in two
processes before one measuring run; see ``build_engine/design.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

from perception.cli import add_progress_flag, show_progress

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception design", description="Measure the design table: one row per "
                                "detector design (family, activation, width/depth/resolution), same bench for all.")
    p.add_argument("--out", required=True, help="output directory (design.json, design.md, design.png, runs/)")
    p.add_argument("--rows", default="", help="comma-separated row keys (default: all; --list shows them)")
    p.add_argument("--list", action="store_true", help="print the row keys and exit")
    p.add_argument("--train-only", action="store_true", help="only train the short-schedule rows, measure nothing")
    p.add_argument("--skip-training", action="store_true",
                   help="never train: a short row without a finished run in OUT/runs is an error")
    p.add_argument("--latency-runs", type=int, default=20, help="timed runs per model (default 20)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    add_progress_flag(p)
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from build_engine import design
    from build_engine.config import load_config
    from build_engine.data.generate import cached_dataset
    from perception.errors import ConfigError

    if args.list:
        for s in design.SPECS:
            print(f"{s.key:28s} {'short run' if s.trained_here else s.checkpoint}  {s.label}")
        return 0
    if args.latency_runs < 1 or args.threads < 1:
        raise ConfigError("--latency-runs and --threads must be >= 1")
    specs = design.select([k for k in args.rows.split(",") if k])
    out = Path(args.out)

    def progress(msg: str) -> None:
        if show_progress(args.no_progress):
            print(f"[design] {msg}", flush=True, file=sys.stderr)

    for spec in specs:
        if spec.trained_here and not args.skip_training:
            design.train_short(spec, out / "runs", progress)
    if args.train_only:
        return 0
    cache = load_config(design.REPO_ROOT / "configs/default.yaml").data.cache_dir
    progress("preparing the held-out test set and the calibration set")
    test_dir = cached_dataset(cache, "test", design.TEST_IMAGES, design.TEST_SEED, 640, 360)
    calib_dir = cached_dataset(cache, "calib", design.CALIB_IMAGES, 4, 640, 360)
    calib = sorted((calib_dir / "images").glob("*.jpg"))
    rows = design.measure(specs, out, test_dir, calib, args.latency_runs, args.threads, progress)
    meta = {"host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "threads": args.threads, "latency_runs": args.latency_runs, "calib_images": len(calib)}
    path = design.write(rows, out, meta)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
    else:
        print(path)
    return 0
