"""``perception prune --checkpoint CKPT --ratio R --out CKPT2 [--finetune-epochs E]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from perception.cli import add_progress_flag, show_progress

REPO_ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perception prune",
        description="Structured pruning: remove whole residual blocks and channels (dependency-aware), "
        "then fine-tune with the training code. Writes a normal weights-only checkpoint.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="trained checkpoint to prune")
    p.add_argument("--ratio", required=True, type=float, help="share of channels removed per layer, e.g. 0.3")
    p.add_argument("--out", required=True, type=Path, help="pruned checkpoint to write")
    p.add_argument("--remove-blocks", type=int, default=-1,
                   help="residual blocks to remove (default: ratio x removable)")
    p.add_argument("--importance", choices=("l1", "bn"), default="l1",
                   help="channel importance: L1 weight norm or |BN gamma|")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="fine-tuning epochs after pruning (default: %(default)s)")
    p.add_argument("--finetune-images", type=int, default=0, help="cap the train images per fine-tune epoch (0: all)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (default: %(default)s)")
    p.add_argument("--distill", type=float, default=1.0, metavar="W",
                   help="weight of distillation from the unpruned checkpoint during fine-tuning; 0 disables "
                        "(default: %(default)s)")
    p.add_argument("--teacher", type=Path, help="checkpoint to distil from (default: --checkpoint; give the unpruned "
                   "original when continuing to fine-tune an already pruned checkpoint)")
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "default.yaml",
                   help="train config for fine-tuning data / loss / optimizer (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a train config value (repeatable)")
    add_progress_flag(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import tempfile

    import torch

    from build_engine.calibration import iter_batches, list_images
    from build_engine.checkpoint import meta_for, save_checkpoint
    from build_engine.data.generate import generate_dataset
    from build_engine.profile import profile_model
    from build_engine.prune import PruneOptions, finetune, prune_model
    from build_engine.pruned_checkpoint import load_any_checkpoint
    from perception.manifest import PreprocessSpec, sha256_file

    opts = PruneOptions(ratio=args.ratio, remove_blocks=args.remove_blocks, importance=args.importance)
    model, meta = load_any_checkpoint(args.checkpoint)
    w, h = (int(v) for v in meta.input_size)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="prune_") as tmp:
        # Block importance is measured on real training images (seed 1 = the train split).
        root = generate_dataset(Path(tmp), 8, 1, 640, 360)
        batch = next(iter_batches(list_images(Path(root)), PreprocessSpec(input_width=w, input_height=h), 8))
    images = torch.from_numpy(batch)
    before = profile_model(model, (1, 3, h, w))
    pruned, info = prune_model(model, images, opts)
    after = profile_model(pruned, (1, 3, h, w))
    kpi: dict[str, float] = {}
    if args.finetune_epochs > 0:
        from build_engine.config import load_config

        cfg = load_config(args.config, args.overrides)
        teacher = None
        if args.distill > 0:  # prune_model pruned a copy: model is the parent
            teacher = load_any_checkpoint(args.teacher)[0] if args.teacher else model
        kpi = finetune(pruned, cfg, args.finetune_epochs, args.lr, args.finetune_images,
                       progress=show_progress(args.no_progress), teacher=teacher, distill_weight=args.distill,
                       classes=meta.classes)
    prev: dict[str, Any] = dict(meta.extra.get("pruned") or {})
    if prev:  # pruning (or fine-tuning) a pruned checkpoint again: its removed blocks stay removed
        info["removed_blocks"] = list(prev.get("removed_blocks", [])) + info["removed_blocks"]
        info["previous"] = prev  # the whole chain: the first entry holds the original pruning step
        prev_epochs = int(prev.get("finetune_epochs_total", prev.get("finetune_epochs", 0)))
        info["finetune_epochs_total"] = prev_epochs + args.finetune_epochs
    info.update(
        macs_before=before.total_macs, macs_after=after.total_macs,
        params_before=before.total_params, params_after=after.total_params,
        finetune_epochs=args.finetune_epochs, finetune_lr=args.lr,
        distill_weight=args.distill if args.finetune_epochs else 0.0,
        parent_checkpoint=args.checkpoint.name, teacher_checkpoint=(args.teacher or args.checkpoint).name,
        parent_sha256=sha256_file(args.checkpoint),
    )
    # Without fine-tuning the pruned model's accuracy is not measured: the parent's val KPI would
    # pass for it (`perception build` measures it on its val set either way).
    new_meta = meta_for(pruned, meta.classes, epoch=meta.epoch, val_kpi=kpi,
                        train_config_hash=meta.train_config_hash, extra={**meta.extra, "pruned": info})
    save_checkpoint(args.out, pruned, new_meta)
    load_any_checkpoint(args.out)  # prove it reloads before reporting success
    summary = {k: info[k] for k in ("macs_before", "macs_after", "params_before", "params_after",
                                    "channels_before", "channels_after", "removed_blocks")}
    summary["macs_ratio"] = round(after.total_macs / max(before.total_macs, 1), 4)
    if kpi:
        summary["val_kpi"] = kpi
    json.dump({"checkpoint": str(args.out), **summary}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0
