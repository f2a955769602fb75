"""The training loop: CPU, deterministic with a seed, EMA, warm-up + schedule, per-epoch JSONL
log of losses and validation KPI (plotted beside it as ``train_curves.png``), weights-only
checkpoints (``last.pt`` with resume state, ``best.pt`` with the best EMA weights by val
mAP50-95), resume from ``last.pt``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch

from build_engine.checkpoint import CheckpointMeta, load_payload, meta_for, save_checkpoint
from build_engine.config import TrainConfig
from build_engine.data.formats import LabelledSet, Sample, read_image, read_labelled_set
from build_engine.data.generate import cached_dataset
from build_engine.evaluate import evaluate_runner, postprocess_for, torch_runner
from build_engine.model import build_model
from build_engine.plots import plot_training_curves
from build_engine.train.augment import hsv_jitter, random_affine
from build_engine.train.ema import ModelEMA
from build_engine.train.schedule import learning_rates
from perception.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_kpi: dict[str, float]
    epochs_run: int
    seconds: float


def prepare_data(cfg: TrainConfig, progress: bool = False) -> tuple[LabelledSet, LabelledSet]:
    """Read ``data.train_dir``/``val_dir``, or generate (once) into the cache directory.

    ConfigError unless both sets list the same classes in the same order: class indices are
    positions in that list, so a val set ordered otherwise would be scored silently under
    the wrong mapping.
    """
    d = cfg.data
    if d.train_dir or d.val_dir:
        if not (d.train_dir and d.val_dir):
            raise ConfigError("data.train_dir and data.val_dir must be given together")
        train_set, val_set = read_labelled_set(d.train_dir), read_labelled_set(d.val_dir)
    else:
        sets = []
        for split, n, seed in (("train", d.train_images, d.train_seed), ("val", d.val_images, d.val_seed)):
            sets.append(read_labelled_set(cached_dataset(d.cache_dir, split, n, seed, d.image_width,
                                                         d.image_height, progress, d.min_object_px)))
        train_set, val_set = sets[0], sets[1]
    if train_set.classes != val_set.classes:
        raise ConfigError(f"{val_set.root}: val classes {list(val_set.classes)} are not the train set's "
                          f"{list(train_set.classes)} ({train_set.root}); both must list the same classes in "
                          "the same order")
    for ds, what in ((train_set, "train"), (val_set, "val")):
        if not any(_objects(s) for s in ds.samples):
            # A val set without one scores "no data" (-1) every epoch, never above the -1 the
            # best starts at: training ran to the end and wrote no best.pt, whose path it printed.
            raise DataError(f"{ds.root}: the {what} set has no labelled object (crowd regions aside): "
                            + ("nothing to learn" if what == "train" else "nothing to score the epochs on"))
    return train_set, val_set


def _objects(sample: Sample) -> int:
    """The sample's labelled objects that are not crowd regions."""
    return int(len(sample.boxes) - (0 if sample.iscrowd is None else int(sample.iscrowd.sum())))


def check_num_classes(cfg: TrainConfig, classes: tuple[str, ...], root: Path) -> None:
    """ConfigError unless the model has one output per class of the data: otherwise a run fails
    only at its first validation (fewer classes) or its first batch (more), and not clearly.
    The count is not derived from the data on purpose: the config (and its hash, which
    checkpoints and resume check) stays what was given."""
    if len(classes) != cfg.model.num_classes:
        raise ConfigError(f"{root}: the data has {len(classes)} classes ({', '.join(classes)}) but "
                          f"model.num_classes is {cfg.model.num_classes}: pass --set model.num_classes={len(classes)}")


class TrainBatch(NamedTuple):
    """One training batch: ``images`` (B, 3, H, W) float RGB in [0, 1]; ``targets`` per image
    (boxes (M, 4) float32 xyxy input px, classes (M,) int64); ``ignore`` per image (K, 4) float32
    xyxy input px, the crowd regions (``build_engine.ignore_regions``)."""

    images: torch.Tensor
    targets: list[tuple[torch.Tensor, torch.Tensor]]
    ignore: list[torch.Tensor]


def load_train_batch(
    ds: LabelledSet, indices: list[int], cfg: TrainConfig, epoch: int, augment: bool = True
) -> TrainBatch:
    """The images of ``indices``, augmented (``augment``) and placed on the model's input canvas,
    with their targets and ignore regions.

    COCO crowd regions (``iscrowd``) are no targets but ignore regions: one box around a group of
    objects is not an object the model should learn to find, nor background it should learn to
    see there (evaluation ignores detections on them); each family's loss leaves the predictions
    in them that are assigned to no object out of its negatives. They move with the image exactly
    as the targets do (one ``random_affine`` for both) and stay while any of them is visible.
    """
    w, h = cfg.model.input_width, cfg.model.input_height
    imgs = np.empty((len(indices), 3, h, w), np.float32)
    targets, ignore = [], []
    for k, i in enumerate(indices):
        s = ds.samples[i]
        img = read_image(s.file)
        if img.shape[1] != s.width or img.shape[0] != s.height:
            raise DataError(f"{s.file}: image is {img.shape[1]}x{img.shape[0]} but its labels say {s.width}x{s.height}")
        rng = np.random.default_rng((cfg.seed, epoch, i)) if augment else None
        crowd = s.crowd_mask()
        canvas, boxes, keep = random_affine(img, s.boxes, w, h, cfg.augment, rng)
        if rng is not None:
            canvas = hsv_jitter(canvas, cfg.augment, rng)
        imgs[k] = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB).transpose(2, 0, 1) / np.float32(255.0)
        positive = keep & ~crowd
        targets.append((torch.from_numpy(boxes[positive]), torch.from_numpy(s.class_ids[positive])))
        # An ignore region is not held to the targets' minimum size: any visible part of a crowd
        # still shows its objects.
        visible = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        ignore.append(torch.from_numpy(boxes[crowd & visible]))
    return TrainBatch(torch.from_numpy(imgs), targets, ignore)


def load_batch(
    ds: LabelledSet, indices: list[int], cfg: TrainConfig, epoch: int, augment: bool = True
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(images, targets) of ``load_train_batch``, without the ignore regions: for a loss that
    takes none (``bench/bench_train.py`` times the one-stage step on generated data, which has
    no crowd regions). Training passes the ignore regions on (``train``)."""
    batch = load_train_batch(ds, indices, cfg, epoch, augment)
    return batch.images, batch.targets


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on conv / linear weights only (not on BN or biases)."""
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    bias: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            no_decay.append(m.weight)
            bias.append(m.bias)
        elif isinstance(m, torch.nn.Conv2d):
            decay.append(m.weight)
            if m.bias is not None:
                bias.append(m.bias)
    o = cfg.optim
    groups = [
        {"params": decay, "weight_decay": o.weight_decay, "kind": "weight"},
        {"params": no_decay, "weight_decay": 0.0, "kind": "weight"},
        {"params": bias, "weight_decay": 0.0, "kind": "bias"},
    ]
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.momentum, 0.999))


def validate(model: torch.nn.Module, val: LabelledSet, cfg: TrainConfig) -> dict[str, float]:
    report, _, _ = evaluate_runner(
        torch_runner(model), val, (cfg.model.input_width, cfg.model.input_height), cfg.score_threshold,
        post=postprocess_for(model),
    )
    d = report.to_dict(curves=False)
    return {k: float(d[k]) for k in ("map50_95", "map50", "map75", "precision", "recall", "f1")}


def train(
    cfg: TrainConfig, out_dir: str | os.PathLike[str], resume: bool = False, progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``cfg``; write checkpoints and ``train_log.jsonl`` into ``out_dir``.

    ``stop_after``: stop after this many epochs of this call (a later ``resume`` continues).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    train_set, val_set = prepare_data(cfg, progress)
    check_num_classes(cfg, train_set.classes, train_set.root)
    model = build_model(cfg.model)
    if cfg.init_checkpoint and not resume:
        init = load_payload(cfg.init_checkpoint)
        try:
            model.load_state_dict(init["state_dict"])
        except RuntimeError as exc:
            raise ConfigError(f"{cfg.init_checkpoint}: does not fit model config {cfg.model}: "
                              f"{str(exc).splitlines()[0]}") from exc
        log.info("initialised from %s", cfg.init_checkpoint)
    optimizer = make_optimizer(model, cfg)
    ema = ModelEMA(model, cfg.optim.ema_decay) if cfg.optim.ema else None
    start_epoch, best = 0, {"map50_95": -1.0}
    last_path, best_path, log_path = out / "last.pt", out / "best.pt", out / "train_log.jsonl"
    if resume:
        if not last_path.is_file():
            raise ConfigError(f"{last_path}: nothing to resume from")
        payload = load_payload(last_path)
        st = payload.get("train_state", {})
        if st.get("config_hash") != cfg.hash():
            raise ConfigError(f"{last_path}: was trained with a different config "
                              f"(hash {st.get('config_hash')} != {cfg.hash()})")
        model.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(st["optimizer"])
        if ema is not None:
            ema.ema.load_state_dict(st["ema"])
            ema.updates = int(st["ema_updates"])
        start_epoch = int(payload["meta"]["epoch"])
        best = dict(st.get("best", best))
        if "torch_rng" in st:  # absent in a last.pt written before it was saved
            torch.set_rng_state(st["torch_rng"])
        else:
            log.warning("%s: has no RNG state; the resumed run will not repeat an uninterrupted one", last_path)
        log.info("resumed from %s at epoch %d", last_path, start_epoch)
    elif log_path.exists():
        log_path.unlink()
    bs = cfg.optim.batch_size
    steps_per_epoch = max(1, len(train_set) // bs)
    o = cfg.optim
    end_epoch = o.epochs if stop_after is None else min(o.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, end_epoch):
        model.train()
        order = np.random.default_rng((cfg.seed, epoch)).permutation(len(train_set)).tolist()
        sums: dict[str, float] = {}
        it: Iterable[int] = range(steps_per_epoch)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(it, desc=f"epoch {epoch + 1}/{o.epochs}", unit="batch", mininterval=5.0)
            it = bar
        te = time.time()
        for k in it:
            step = epoch * steps_per_epoch + k
            lr_w, lr_b = learning_rates(step, steps_per_epoch, o.epochs, o.lr, o.schedule, o.final_lr_ratio,
                                        o.warmup_epochs, o.warmup_bias_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr_b if g["kind"] == "bias" else lr_w
            batch = load_train_batch(train_set, order[k * bs:(k + 1) * bs], cfg, epoch)
            loss, parts = model.training_loss(  # type: ignore[operator]  # family contract
                batch.images, batch.targets, cfg.loss, ignore=batch.ignore)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            parts["total"] = float(loss.detach())
            for name, v in parts.items():
                sums[name] = sums.get(name, 0.0) + v
            if bar is not None:
                bar.set_postfix(loss=f"{sums['total'] / (k + 1):.3f}", lr=f"{lr_w:.4f}")
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr_w, "seconds": round(time.time() - te, 1)}
        record.update({f"loss_{n}": round(v / steps_per_epoch, 5) for n, v in sums.items()})
        eval_model = ema.ema if ema is not None else model
        last = epoch + 1 == o.epochs
        if (epoch + 1) % cfg.eval_every == 0 or last:
            kpi = validate(eval_model, val_set, cfg)
            record["val"] = kpi
            if kpi["map50_95"] > best["map50_95"]:
                best = dict(kpi, epoch=epoch + 1)
                best_meta = meta_for(eval_model, train_set.classes, epoch=epoch + 1, val_kpi=kpi,
                                     train_config_hash=cfg.hash())
                save_checkpoint(best_path, eval_model, best_meta)
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        plot_training_curves(log_path, out / "train_curves.png")
        log.info("epoch %d: %s", epoch + 1, json.dumps(record))
        state = {
            "optimizer": optimizer.state_dict(),
            "config_hash": cfg.hash(),
            "best": best,
            "ema": ema.ema.state_dict() if ema is not None else {},
            "ema_updates": ema.updates if ema is not None else 0,
            # The global torch RNG draws during training (the two-stage family samples RoIs
            # with it): a resumed run continues from here, not from manual_seed(cfg.seed).
            # Data order and augmentation draw from generators seeded by (seed, epoch).
            "torch_rng": torch.get_rng_state(),
        }
        last_meta = meta_for(model, train_set.classes, epoch=epoch + 1, train_config_hash=cfg.hash())
        save_checkpoint(last_path, model, last_meta, state)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    return TrainResult(out, best_path, last_path, best, end_epoch - start_epoch, time.time() - t0)


def ema_checkpoint_meta(path: Path) -> CheckpointMeta:
    return CheckpointMeta.from_dict(load_payload(path)["meta"])
