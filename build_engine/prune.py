"""Structured pruning: remove whole residual blocks and whole channels, then fine-tune.

* **Block removal**: the residual blocks with the smallest contribution (the L1 norm of the
  BN gammas of their last conv: a block whose output is ~0 is ~identity) are deleted from
  their ``nn.Sequential``. Only blocks with an identity shortcut can go.
* **Channel pruning**: dependency-aware, with Torch-Pruning's ``DependencyGraph``: removing an
  output channel of a conv also removes the matching BN channel, the input channel of every
  consumer, and keeps concat / residual groups consistent. Importance is the L1 norm of the
  conv weights or |BN gamma|. The head's prediction convs and the stem's input are never pruned.

The pruned model physically has fewer channels. It is saved as a normal weights-only
checkpoint whose ``meta.extra["pruned"]`` lists the removed blocks; ``load_any_checkpoint``
rebuilds the architecture from the config, removes those blocks, resizes every layer to the
saved tensor shapes, and loads the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from build_engine.pruned_checkpoint import remove_blocks
from perception.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


IMPORTANCES = ("l1", "bn")


@dataclass(frozen=True)
class PruneOptions:
    """ratio: share of channels removed per prunable layer (MACs fall roughly as (1 - ratio)^2).
    remove_blocks: residual blocks to delete (-1: the same share ``ratio`` of the removable ones)."""

    ratio: float
    remove_blocks: int = -1
    importance: str = "l1"
    round_to: int = 0  # kept channel counts are multiples of this; 0: the model's channel_multiple

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 0.95:
            raise ConfigError(f"pruning ratio must be in [0, 0.95), got {self.ratio}")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if self.round_to < 0:
            raise ConfigError("round_to must be >= 0")


def removable_blocks(model: nn.Module) -> list[str]:
    """Residual blocks with an identity shortcut that sit in an ``nn.Sequential``: removing one
    leaves a valid network (the shortcut carries the signal)."""
    from build_engine.model.blocks import ResidualBlock

    parents = {name: m for name, m in model.named_modules() if isinstance(m, nn.Sequential)}
    out = []
    for name, m in model.named_modules():
        parent = name.rpartition(".")[0]
        if isinstance(m, ResidualBlock) and m.shortcut and parent in parents:
            out.append(name)
    return out


def block_contributions(model: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, float]:
    """mean |block(x) - x| / mean |x| per block on real ``images``: how far from identity it is."""
    scores: dict[str, list[float]] = {n: [] for n in names}
    handles = []
    for n in names:
        def hook(mod: nn.Module, args: Any, out: torch.Tensor, n: str = n) -> None:
            x = args[0]
            scores[n].append(float((out - x).abs().mean() / x.abs().mean().clamp(min=1e-12)))

        handles.append(model.get_submodule(n).register_forward_hook(hook))
    model.eval()
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return {n: float(np.mean(v)) for n, v in scores.items()}


def conv_channels(model: nn.Module) -> int:
    """Total output channels over all convolutions (the physical width of the network)."""
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def prune_model(model: nn.Module, images: torch.Tensor, opts: PruneOptions) -> tuple[nn.Module, dict[str, Any]]:
    """Prune a copy of ``model`` (a Detector): remove blocks, then channels. Returns the pruned
    model (eval mode) and a JSON-able description (stored in the checkpoint's meta)."""
    import copy

    import torch_pruning as tp

    family = getattr(getattr(model, "cfg", None), "family", "yolo")
    if family != "yolo":
        raise ModelError(f"pruning supports the yolo family (its heads and distillation loss); got {family!r}")
    pruned = copy.deepcopy(model).eval()
    # INT8 kernels want the same channel multiple the architecture was designed with.
    round_to = opts.round_to or int(getattr(getattr(model, "cfg", None), "channel_multiple", 8))
    before = conv_channels(pruned)
    candidates = removable_blocks(pruned)
    n_remove = opts.remove_blocks if opts.remove_blocks >= 0 else int(round(opts.ratio * len(candidates)))
    n_remove = min(n_remove, len(candidates))
    scores = block_contributions(pruned, candidates, images) if candidates else {}
    removed = sorted(candidates, key=lambda n: scores[n])[:n_remove]
    remove_blocks(pruned, removed)
    if opts.ratio > 0:
        heads = getattr(pruned, "heads", [])
        # Never prune what the output layout fixes: the prediction convs' output channels.
        ignored = [m for h in heads for m in (h.cls_pred, h.box_pred, h.obj_pred)]
        importance = (tp.importance.MagnitudeImportance(p=1) if opts.importance == "l1"
                      else tp.importance.BNScaleImportance())
        example = images[:1]
        try:
            pruner = tp.pruner.MetaPruner(
                pruned, example, importance=importance, pruning_ratio=opts.ratio,
                ignored_layers=ignored, round_to=round_to,
            )
            pruner.step()
        except Exception as exc:  # torch-pruning raises assorted errors on untraceable graphs
            raise ModelError(f"channel pruning failed: {exc}") from exc
    pruned.eval()
    criterion = "L1 weight norm" if opts.importance == "l1" else "|BN gamma|"
    info = {
        "method": f"{len(removed)} residual blocks removed (smallest |f(x)| / |x| on real images), then "
                  f"{opts.ratio:.0%} of channels per layer by {criterion} "
                  f"(Torch-Pruning dependency graph, rounded to {round_to})",
        "ratio": opts.ratio,
        "importance": opts.importance,
        "removed_blocks": removed,
        "block_scores": {k: round(v, 5) for k, v in scores.items()},
        "channels_before": before,
        "channels_after": conv_channels(pruned),
    }
    return pruned, info


def finetune(
    model: nn.Module, train_cfg: Any, epochs: int, lr: float, max_images: int = 0, progress: bool = True,
    teacher: nn.Module | None = None, distill_weight: float = 1.0, classes: Sequence[str] = (),
) -> dict[str, float]:
    """Fine-tune a (pruned) detector with the training code's data, loss, optimizer, schedule
    and EMA; return the val KPI of the EMA weights. ``max_images`` > 0 caps the train set.

    teacher: the unpruned parent; when given, ``distill_weight`` x ``losses.distillation_loss``
    (the student's raw head maps pulled towards the teacher's on every batch) is added to the
    detection loss. The teacher sees the same augmented images and stays frozen in eval mode.
    classes: the model's classes (its checkpoint's); ConfigError unless the config's data has
    them, in order (a model trained on its own data would be fine-tuned on the generated set's
    classes, every id another class's).
    """
    import dataclasses

    from build_engine.losses import DetectionLoss, distillation_loss
    from build_engine.model.detector import Detector
    from build_engine.train.ema import ModelEMA
    from build_engine.train.schedule import learning_rates
    from build_engine.train.trainer import load_train_batch, make_optimizer, prepare_data, validate

    if not isinstance(model, Detector) or not (teacher is None or isinstance(teacher, Detector)):
        raise ModelError("fine-tuning needs detectors (build_engine.model.Detector, pruned or not)")
    o = dataclasses.replace(train_cfg.optim, lr=lr, epochs=max(epochs, 1), warmup_epochs=0.0)
    # Train at the model's own input size, whatever the config says: the head's anchor grid
    # is built for it, and images letterboxed to another size silently wreck the weights.
    size = getattr(model, "cfg", None)
    model_cfg = train_cfg.model
    if size is not None:
        model_cfg = dataclasses.replace(model_cfg, input_width=size.input_width, input_height=size.input_height)
    cfg = dataclasses.replace(train_cfg, optim=o, model=model_cfg)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train_set, val_set = prepare_data(cfg, progress)
    if classes and tuple(train_set.classes) != tuple(classes):
        raise ConfigError(f"the fine-tuning data's classes {list(train_set.classes)} are not the model's "
                          f"{list(classes)}: give --config / overrides with the data the model was trained on")
    n = min(len(train_set), max_images) if max_images > 0 else len(train_set)
    optimizer = make_optimizer(model, cfg)
    ema = ModelEMA(model, o.ema_decay) if o.ema else None
    # The model's class count, not the config's: a 3-class checkpoint fine-tuned with the default
    # config (7 classes) failed after pruning and loading the data, on the first batch.
    criterion = DetectionLoss(cfg.loss, model.cfg.num_classes)
    centers, strides = model.anchor_points()
    bs = o.batch_size
    steps = max(1, n // bs)
    for epoch in range(epochs):
        model.train()
        order = np.random.default_rng((cfg.seed, 1000 + epoch)).permutation(len(train_set))[:n].tolist()
        it: Iterable[int] = range(steps)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"fine-tune {epoch + 1}/{epochs}", unit="batch", mininterval=5.0)
        total = 0.0
        for k in it:
            lr_w, lr_b = learning_rates(epoch * steps + k, steps, epochs, o.lr, o.schedule, o.final_lr_ratio, 0.0, o.lr)
            for g in optimizer.param_groups:
                g["lr"] = lr_b if g["kind"] == "bias" else lr_w
            images, targets, ignore = load_train_batch(train_set, order[k * bs : (k + 1) * bs], cfg, epoch)
            raws = model(images)
            loss, _ = criterion(model.decode(raws), centers, strides, targets, ignore=ignore)
            if teacher is not None and distill_weight > 0:
                with torch.no_grad():
                    teacher_raws = teacher.forward_raw(images)
                loss = loss + distill_weight * distillation_loss(raws, teacher_raws)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            total += float(loss.detach())
        log.info("fine-tune epoch %d/%d: mean loss %.4f over %d batches", epoch + 1, epochs, total / steps, steps)
    final = ema.ema if ema is not None else model
    if final is not model:
        model.load_state_dict(final.state_dict())
    model.eval()
    return validate(model, val_set, cfg) if epochs > 0 else {}
