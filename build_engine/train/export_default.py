"""Publish a training run as a shipped model directory (``models/default``):
``detector.pt`` (weights-only, EMA weights), ``config.yaml`` (model, classes, pre/post-processing
defaults, provenance) and, when the run has been evaluated, ``eval.json`` + ``eval.md`` + plots.

  python -m build_engine.train.export_default RUN_DIR models/default
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from build_engine.checkpoint import load_checkpoint, meta_for, save_checkpoint


def model_card(meta_kpi: dict[str, Any], cfg: dict[str, Any], classes: tuple[str, ...], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "default",
        "classes": list(classes),
        "model": cfg,
        "preprocess": {"input_width": cfg["input_width"], "input_height": cfg["input_height"], "letterbox": True,
                       "pad_value": 114, "color_order": "RGB", "scale": 1.0 / 255.0},
        "postprocess": {"output_layout": "xyxy_obj_cls", "score_threshold": 0.25, "iou_threshold": 0.5, "max_detections": 100},
        "val_kpi": meta_kpi,
        **extra,
    }


# A run directory nests each later stage inside the one it continues from:
# RUN/ (stage 1), RUN/finetune/ (stage 2), RUN/finetune/hires/ (stage 3); see scripts/train_default.sh.
STAGE_CONFIGS = {"finetune": "configs/default_finetune.yaml", "hires": "configs/default_hires.yaml"}


def training_stages(run_dir: Path) -> list[tuple[str, Path]]:
    """(config, run directory) of every stage that led to ``run_dir``, first stage first."""
    stages: list[tuple[str, Path]] = []
    d = run_dir
    while d.name in STAGE_CONFIGS:
        stages.append((STAGE_CONFIGS[d.name], d))
        d = d.parent
    stages.append(("configs/default.yaml", d))
    return stages[::-1]


def export(run_dir: Path, out_dir: Path, eval_dir: Path | None = None) -> Path:
    model, meta = load_checkpoint(run_dir / "best.pt")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_dir / "detector.pt", model, meta_for(model, meta.classes, epoch=meta.epoch, val_kpi=meta.val_kpi,
                                                                train_config_hash=meta.train_config_hash))
    stages = training_stages(run_dir)
    recipe = " then ".join(config for config, _ in stages)
    extra: dict[str, Any] = {"train_config": recipe, "train_config_hash": meta.train_config_hash, "epoch": meta.epoch}
    card = model_card(meta.val_kpi, meta.model_config, meta.classes, extra)
    (out_dir / "config.yaml").write_text("# Written by build_engine.train.export_default; see eval.md for the full report.\n"
                                         + yaml.safe_dump(card, sort_keys=False))
    eval_dir = eval_dir or run_dir / "eval"
    if (eval_dir / "kpi.json").is_file():
        from build_engine.eval_cli import format_table

        kpi = json.loads((eval_dir / "kpi.json").read_text())
        small = {k: v for k, v in kpi.items() if k not in ("pr_curves", "f1_curve")}
        (out_dir / "eval.json").write_text(json.dumps(small, indent=1) + "\n")
        plots = out_dir / "plots"
        plots.mkdir(exist_ok=True)
        for png in ("pr_curve.png", "f1_confidence.png", "confusion_matrix.png"):
            if (eval_dir / png).is_file():
                shutil.copy(eval_dir / png, plots / png)
        lines = ["# Default detector: evaluation", "",
                 f"Checkpoint `detector.pt` (epoch {meta.epoch} of {recipe}, config hash {meta.train_config_hash}; "
                 "reproduce with `scripts/train_default.sh`).",
                 "Held-out generated test set (seed 3, 300 images 640x360; never used for training or for choosing",
                 "the checkpoint), scored through the serving pre/post-processing (letterbox, decode, NMS).", "",
                 "```", format_table(small), "```", ""]
        val_kpi = run_dir / "eval_val" / "kpi.json"
        if val_kpi.is_file():
            v = json.loads(val_kpi.read_text())
            lines += [f"On the val set (seed 2, 300 images; it chose the checkpoint): mAP50 {v['map50']:.4f}, "
                      f"mAP50-95 {v['map50_95']:.4f}, P {v['precision']:.4f}, R {v['recall']:.4f} at score >= {v['score_threshold']}.", ""]
        lines += [
                 "![PR curve](plots/pr_curve.png) ![F1](plots/f1_confidence.png) ![confusion](plots/confusion_matrix.png)", ""]
        for i, (config, stage_dir) in enumerate(stages, 1):
            label, path = f"stage {i} ({config})", stage_dir / "train_log.jsonl"
            if not path.is_file():
                continue
            hist = [json.loads(line) for line in path.read_text().splitlines()]
            total = sum(h.get("seconds", 0) for h in hist)
            lines += [f"Training {label}: {len(hist)} epochs, {total / 60:.1f} min of epoch time on a shared 2-core CPU (1 thread).", "",
                      "| epoch | loss | val mAP50 | val mAP50-95 |", "|---|---|---|---|"]
            for h in hist:
                v = h.get("val", {})
                lines.append(f"| {h['epoch']} | {h.get('loss_total', 0):.3f} | {v.get('map50', float('nan')):.4f} | {v.get('map50_95', float('nan')):.4f} |")
            lines.append("")
        (out_dir / "eval.md").write_text("\n".join(lines) + "\n")
    return out_dir


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (2, 3):
        print("usage: python -m build_engine.train.export_default RUN_DIR OUT_DIR [EVAL_DIR]", file=sys.stderr)
        sys.exit(2)
    print(export(Path(args[0]), Path(args[1]), Path(args[2]) if len(args) == 3 else None))
