"""Publish a training run as a shipped model directory (``models/default``, ``models/ssd``, ...):
``detector.pt`` (weights-only, EMA weights), ``config.yaml`` (model, classes, pre/post-processing
defaults, provenance) and, when the run has been evaluated, ``eval.json`` + ``eval.md`` + plots.
When the run holds a pruned, fine-tuned copy (``RUN/pruned.pt``, from ``perception prune``) it is
published too, as ``detector_pruned.pt`` with ``eval_pruned.json``.

  python -m build_engine.train.export_default RUN_DIR models/default [EVAL_DIR] [--config FILE]

scripts/train_default.sh lays the run out: RUN/best.pt, RUN/eval (test), RUN/eval_val,
RUN/pruned.pt, RUN/eval_pruned (test); scripts/train_family.sh does the same (without pruning)
for the other families' configs (configs/ssd.yaml, configs/rcnn.yaml). A fine-tune (a run whose
config has ``init_checkpoint``, e.g. the far-object stage's RUN/far, with RUN/far/eval_far on
far test scenes) is published with what it started from and what it changed of its recipe.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from build_engine.checkpoint import load_checkpoint, meta_for, save_checkpoint


def model_card(
    meta_kpi: dict[str, Any], cfg: dict[str, Any], classes: tuple[str, ...], extra: dict[str, Any],
    name: str = "default", output_layout: str = "yolo_obj",
) -> dict[str, Any]:
    return {
        "name": name,
        "classes": list(classes),
        "model": cfg,
        "preprocess": {"input_width": cfg["input_width"], "input_height": cfg["input_height"], "letterbox": True,
                       "pad_value": 114, "color_order": "RGB", "scale": 1.0 / 255.0},
        "postprocess": {"output_layout": output_layout, "score_threshold": 0.25, "iou_threshold": 0.5,
                        "max_detections": 100},
        "val_kpi": meta_kpi,
        **extra,
    }


TRAIN_CONFIG = "configs/default.yaml"


def _overrides(run_cfg: dict[str, Any], recipe: str) -> str:
    """What a run changed of its recipe (the config file it names), in words: every value that
    differs, the init checkpoint aside ("" for none, or when the recipe cannot be read)."""
    from build_engine.config import load_config
    from perception.errors import ConfigError

    if not run_cfg:
        return ""
    try:
        base = load_config(recipe).to_dict()
    except ConfigError:
        return ""
    said = []
    for key, value in sorted(run_cfg.items()):
        if key == "init_checkpoint":
            continue
        if isinstance(value, dict):
            said += [f"{key}.{k}={v:g}" if isinstance(v, float) else f"{key}.{k}={v}"
                     for k, v in sorted(value.items()) if base.get(key, {}).get(k) != v]
        elif base.get(key) != value:
            said.append(f"{key}={value}")
    return ", ".join(f"`{s}`" for s in said)


def _base_training(init: Path, out_dir: Path, recipe: str) -> list[str]:
    """The epoch table of the training a fine-tune started from: its run's log when the init
    checkpoint sits in its run directory; the table of the report it was published with when
    it is a published model's ``detector.pt`` (this directory's own, fine-tuned in place, or
    another's, e.g. models/default's); else nothing."""
    log = init.parent / "train_log.jsonl"
    if log.is_file() and init.parent.resolve() != out_dir.resolve():
        cfg = init.parent / "config.json"
        threads = int(json.loads(cfg.read_text()).get("threads", 1)) if cfg.is_file() else 1
        return _epoch_table(log, threads, f"Training ({recipe})")
    report = init.parent / "eval.md"
    if init.name != "detector.pt" or not report.is_file():
        return []
    old = report.read_text().splitlines()
    start = next((i for i, line in enumerate(old) if line.startswith(f"Training ({recipe}")), None)
    if start is None:
        return []
    end = start + 2  # the title and the blank line under it, then the table's rows
    while end < len(old) and old[end].startswith("|"):
        end += 1
    return old[start:end] + [""]


def _epoch_table(path: Path, threads: int, title: str) -> list[str]:
    hist = [json.loads(line) for line in path.read_text().splitlines()]
    total = sum(h.get("seconds", 0) for h in hist)
    lines = [f"{title}: {len(hist)} epochs, {total / 60:.1f} min of epoch time on a 2-core CPU "
             f"({threads} thread{'s' if threads != 1 else ''}).", "",
             "| epoch | loss | val mAP50 | val mAP50-95 |", "|---|---|---|---|"]
    for h in hist:
        v = h.get("val", {})
        lines.append(f"| {h['epoch']} | {h.get('loss_total', 0):.3f} | {v.get('map50', float('nan')):.4f} "
                     f"| {v.get('map50_95', float('nan')):.4f} |")
    return lines + [""]


def _pruned_section(run_dir: Path, out_dir: Path) -> list[str]:
    """Publish RUN/pruned.pt (and its test-set KPI) when the run has one; the eval.md lines."""
    from build_engine.pruned_checkpoint import load_any_checkpoint

    src = run_dir / "pruned.pt"
    if not src.is_file():
        return []
    model, meta = load_any_checkpoint(src)
    save_checkpoint(out_dir / "detector_pruned.pt", model, meta, half=True)
    info = meta.extra.get("pruned", {})
    first = info  # a checkpoint fine-tuned further keeps its pruning step under "previous"
    while first.get("previous"):
        first = first["previous"]
    epochs = info.get("finetune_epochs_total", info.get("finetune_epochs", 0))
    macs_ratio = info.get("macs_after", 0) / max(first.get("macs_before", 1), 1)
    lines = ["## Pruned variant", "",
             f"`detector_pruned.pt`: {first.get('method', 'pruned')}; fine-tuned "
             f"{epochs} epochs, distilled from `detector.pt`. "
             f"{info.get('macs_after', 0) / 1e6:.1f} M MACs ({macs_ratio:.2f}x), "
             f"{info.get('params_after', 0) / 1e6:.3f} M params. "
             f"`perception build --pruned {out_dir.as_posix()}/detector_pruned.pt` "
             "adds it to the build's variants.", ""]
    kpi_path = run_dir / "eval_pruned" / "kpi.json"
    if kpi_path.is_file():
        from build_engine.eval_cli import format_table

        kpi = {k: v for k, v in json.loads(kpi_path.read_text()).items() if k not in ("pr_curves", "f1_curve")}
        (out_dir / "eval_pruned.json").write_text(json.dumps(kpi, indent=1) + "\n")
        lines += ["Held-out test set:", "", "```", format_table(kpi), "```", ""]
    return lines


def export(run_dir: Path, out_dir: Path, eval_dir: Path | None = None, recipe: str = TRAIN_CONFIG) -> Path:
    model, meta = load_checkpoint(run_dir / "best.pt")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Shipped in FP16 (half the size in the repository); every loader reads it back as FP32.
    # scripts/train_default.sh scores the published files, so the reports describe these weights.
    shipped_meta = meta_for(model, meta.classes, epoch=meta.epoch, val_kpi=meta.val_kpi,
                            train_config_hash=meta.train_config_hash)
    save_checkpoint(out_dir / "detector.pt", model, shipped_meta, half=True)
    run_config = run_dir / "config.json"
    run_cfg = json.loads(run_config.read_text()) if run_config.is_file() else {}
    extra: dict[str, Any] = {"train_config": recipe, "train_config_hash": meta.train_config_hash, "epoch": meta.epoch}
    init = str(run_cfg.get("init_checkpoint") or "")
    if init:  # a fine-tune: what it started from (and, while that file is there, which training made it)
        extra["fine_tuned_from"] = init
        if Path(init).is_file():
            base = load_checkpoint(init)[1]
            extra["fine_tuned_from_config_hash"], extra["fine_tuned_from_epoch"] = base.train_config_hash, base.epoch
    far_px = float(run_cfg.get("data", {}).get("min_object_px", 0) or 0)
    if far_px:  # trained on far objects (data.min_object_px)
        extra["min_object_px"] = far_px
    card = model_card(meta.val_kpi, meta.model_config, meta.classes, extra, out_dir.name,
                      getattr(model, "output_layout", "yolo_obj"))
    (out_dir / "config.yaml").write_text(
        "# Written by build_engine.train.export_default; see eval.md for the full report.\n"
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
        title = "Default detector" if out_dir.name == "default" else f"{out_dir.name} detector"
        script = "scripts/train_default.sh" if recipe == TRAIN_CONFIG else f"scripts/train_family.sh {out_dir.name}"
        if init and far_px and recipe == TRAIN_CONFIG:  # the script's optional far-object stage
            script = f"FAR_EPOCHS={run_cfg.get('optim', {}).get('epochs')} FAR_PX={far_px:g} {script}"
        changed = _overrides(run_cfg, recipe)
        with_changes = f"{recipe} with {changed}" if changed else recipe
        if init:
            provenance = (f"Checkpoint `detector.pt`: `{init}` fine-tuned on {with_changes} (epoch {meta.epoch} "
                          f"of the fine-tune, config hash {meta.train_config_hash}; reproduce with `{script}`).")
        else:
            provenance = (f"Checkpoint `detector.pt` (epoch {meta.epoch} of {with_changes}, config hash "
                          f"{meta.train_config_hash}; reproduce with `{script}`).")
        lines = [f"# {title}: evaluation", "", provenance,
                 "Held-out generated test set (seed 3, 300 images 640x360; never used for training or for choosing",
                 "the checkpoint), scored through the serving pre/post-processing (letterbox, decode, NMS).", "",
                 "```", format_table(small), "```", ""]
        far_kpi = run_dir / "eval_far" / "kpi.json"
        if far_px and far_kpi.is_file():
            far = {k: v for k, v in json.loads(far_kpi.read_text()).items() if k not in ("pr_curves", "f1_curve")}
            lines += [f"The same test images' scenes with objects out to {far_px:g} px tall (`gen-data --seed 3 "
                      f"--min-object-px {far_px:g}`, the fine-tune's kind of data):", "",
                      "```", format_table(far), "```", ""]
        val_kpi = run_dir / "eval_val" / "kpi.json"
        if val_kpi.is_file():
            v = json.loads(val_kpi.read_text())
            kind = f", objects out to {far_px:g} px" if far_px else ""
            lines += [f"On the val set (seed 2, 300 images{kind}; it chose the checkpoint): mAP50 {v['map50']:.4f}, "
                      f"mAP50-95 {v['map50_95']:.4f}, P {v['precision']:.4f}, R {v['recall']:.4f} "
                      f"at score >= {v['score_threshold']}.", ""]
        lines += ["![PR curve](plots/pr_curve.png) ![F1](plots/f1_confidence.png) "
                  "![confusion](plots/confusion_matrix.png)", ""]
        if init:
            lines += _base_training(Path(init), out_dir, recipe)
        if (run_dir / "train_log.jsonl").is_file():
            threads = int(run_cfg.get("threads", 1))
            title = f"Fine-tune ({with_changes})" if init else f"Training ({with_changes})"
            lines += _epoch_table(run_dir / "train_log.jsonl", threads, title)
            from build_engine.plots import plot_training_curves

            plot_training_curves(run_dir / "train_log.jsonl", plots / "train_curves.png")
            lines += ["![training curves](plots/train_curves.png)", ""]
        lines += _pruned_section(run_dir, out_dir)
        (out_dir / "eval.md").write_text("\n".join(lines) + "\n")
    return out_dir


if __name__ == "__main__":
    args = sys.argv[1:]
    recipe = TRAIN_CONFIG
    if "--config" in args:
        i = args.index("--config")
        recipe = args[i + 1] if i + 1 < len(args) else ""
        del args[i:i + 2]
    if len(args) not in (2, 3) or not recipe:
        print("usage: python -m build_engine.train.export_default RUN_DIR OUT_DIR [EVAL_DIR] [--config FILE]",
              file=sys.stderr)
        sys.exit(2)
    print(export(Path(args[0]), Path(args[1]), Path(args[2]) if len(args) == 3 else None, recipe))
