"""The train config: one YAML file with sections, command-line overrides ``--set key=value``.

Every section is a frozen dataclass validated on construction; an unknown key (in the file or
an override) is a one-line ``ConfigError`` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from build_engine.losses import LossConfig, check_sigmoid_cls_loss, yolo_ignored_settings
from build_engine.model.config import PRESETS, ModelConfig
from build_engine.model.rcnn_loss import rcnn_ignored_settings
from build_engine.model.ssd_loss import check_ssd_cls_loss, ssd_ignored_settings
from perception.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "linear", "constant")


def check_fields(obj: Any, section: str) -> None:
    """ConfigError naming ``section.field`` unless each number field of the dataclass ``obj`` holds
    what its type says: an int field an integer (2.5 epochs failed in range() after loading), a
    float field a finite number (NaN passes every range check written as "< 0", inf every ">= 0",
    and either trains on NaN), a bool field true or false."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if f.type in ("bool", bool):
            ok, want = isinstance(v, bool), "true or false"
        elif f.type in ("int", int):
            ok, want = number and isinstance(v, int), "an integer"
        elif f.type in ("float", float):
            ok, want = number and math.isfinite(v), "a finite number"
        else:
            continue
        if not ok:
            raise ConfigError(f"{f'{section}.' if section else ''}{f.name} must be {want}, got {v!r}")


def check_range(
    value: float, lo: float, hi: float, name: str, lo_open: bool = False, hi_open: bool = False, why: str = "",
) -> None:
    """ConfigError naming ``name`` (and ``why``) unless ``value`` is in the interval from ``lo`` to ``hi``."""
    above = value > lo if lo_open else value >= lo
    below = value < hi if hi_open else value <= hi
    if not (above and below):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"{name} must be in {interval}{f' ({why})' if why else ''}, got {value!r}")


# data.min_object_px: from 2 px up to (not including) 16, the largest of the generator's
# per-class floors (build_engine.data.scene.random_object), above which it changes nothing.
MIN_OBJECT_PX = (2.0, 16.0)


def check_min_object_px(value: object, name: str) -> None:
    """ConfigError unless ``value`` is 0 (the classes' own floors) or in ``MIN_OBJECT_PX``."""
    lo, hi = MIN_OBJECT_PX
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value == 0 or lo <= value < hi):
        raise ConfigError(f"{name} must be 0 (the classes' own floors, 11-16 px) or from {lo:g} up to {hi:g} "
                          f"pixels (a floor at or above a class's own changes nothing), got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where training data comes from: ``train_dir``/``val_dir`` (COCO or YOLO), or, when empty,
    generated into ``cache_dir`` from the seeds below (never committed)."""

    train_dir: str = ""
    val_dir: str = ""
    cache_dir: str = "~/.cache/perception/data"
    train_images: int = 4000
    val_images: int = 300
    image_width: int = 640
    image_height: int = 360
    train_seed: int = 1
    val_seed: int = 2
    # Generated objects are placed out to where they are this many pixels tall (0: 11-16 px by
    # class, the default). Lower it to train for far, small objects.
    min_object_px: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self, "data")
        if self.train_images <= 0 or self.val_images <= 0:
            raise ConfigError("data.train_images and data.val_images must be positive")
        check_min_object_px(self.min_object_px, "data.min_object_px")
        if self.min_object_px and (self.train_dir or self.val_dir):
            raise ConfigError("data.min_object_px shapes generated data only; it does nothing with "
                              "data.train_dir / data.val_dir")
        if self.image_width <= 0 or self.image_height <= 0:
            raise ConfigError("data.image_width and data.image_height must be positive")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    final_lr_ratio: float = 0.05
    warmup_epochs: float = 1.0
    warmup_bias_lr: float = 0.1
    epochs: int = 30
    batch_size: int = 16
    grad_clip: float = 10.0
    ema: bool = True
    ema_decay: float = 0.9995

    def __post_init__(self) -> None:
        check_fields(self, "optim")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optim.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr <= 0 or self.epochs <= 0 or self.batch_size <= 0:
            raise ConfigError("optim.lr, optim.epochs and optim.batch_size must be positive")
        if not 0 <= self.ema_decay < 1 or self.warmup_epochs < 0 or not 0 < self.final_lr_ratio <= 1:
            raise ConfigError("optim.ema_decay must be in [0, 1), warmup_epochs >= 0, final_lr_ratio in (0, 1]")
        # torch checks neither per-group weight decay (a negative one grows the weights) nor, for
        # SGD, momentum past 1; AdamW refuses a beta past 1 without naming the setting.
        for name in ("weight_decay", "warmup_bias_lr", "grad_clip"):  # grad_clip 0: no clipping
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        sgd = self.optimizer == "sgd"
        check_range(self.momentum, 0.0, 1.0, "optim.momentum", lo_open=sgd, hi_open=True,
                    why="SGD's Nesterov momentum" if sgd else "AdamW's beta1")


@dataclass(frozen=True)
class AugmentConfig:
    flip: float = 0.5
    scale_min: float = 0.7
    scale_max: float = 1.4
    translate: float = 0.1
    hsv_h: float = 0.015
    hsv_s: float = 0.5
    hsv_v: float = 0.35
    min_box_px: float = 2.0
    min_visible: float = 0.4

    def __post_init__(self) -> None:
        check_fields(self, "augment")
        if not 0 <= self.flip <= 1 or not 0 < self.scale_min <= self.scale_max:
            raise ConfigError("augment.flip must be in [0, 1] and 0 < scale_min <= scale_max")
        # Fractions: translate of the canvas (past 1 the image leaves it), hsv_* of each channel's
        # gain (past 1 a gain goes negative), min_visible of a box's area (past 1 nothing is kept).
        for name in ("translate", "hsv_h", "hsv_s", "hsv_v", "min_visible"):
            check_range(getattr(self, name), 0.0, 1.0, f"augment.{name}")
        if self.min_box_px < 0:
            raise ConfigError(f"augment.min_box_px must be >= 0, got {self.min_box_px}")


@dataclass(frozen=True)
class TrainConfig:
    name: str = "default"
    preset: str = "nano"
    seed: int = 0
    threads: int = 2
    eval_every: int = 1
    score_threshold: float = 0.25
    init_checkpoint: str = ""  # start from these weights (fine-tuning); empty = random init
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        check_fields(self, "")
        check_fields(self.model, "model")  # ModelConfig range-checks, but takes 2.5 for an int
        if self.threads < 1 or self.eval_every < 1:
            raise ConfigError("threads and eval_every must be >= 1")
        if self.seed < 0:  # numpy's generators (data order, augmentation) take no negative seed
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        check_range(self.score_threshold, 0.0, 1.0, "score_threshold")
        family = self.model.family
        # At load, not at the first batch of a training run.
        if family == "yolo":
            check_sigmoid_cls_loss(self.loss, "the yolo family")
        elif family == "ssd":
            check_ssd_cls_loss(self.loss)
        ignored = IGNORED_LOSS_SETTINGS[family](self.loss)
        if ignored:  # a setting that parses and changes nothing: the run is not what was asked for
            raise ConfigError(f"the {family} family does not read {'; '.join(ignored)}: it would change "
                              "nothing in training; drop the setting or give it its default")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Short content hash (provenance: which config produced a checkpoint)."""
        d = self.to_dict()
        if not d["init_checkpoint"]:
            del d["init_checkpoint"]  # keeps hashes of from-scratch configs stable across versions
        # Fields added later drop out at their defaults, so older runs keep their hashes.
        for section, key, default in HASH_STABLE_DEFAULTS:
            if d[section].get(key) == default:
                del d[section][key]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Per family: the loss settings a config moves off their defaults that its loss does not read.
IGNORED_LOSS_SETTINGS: dict[str, Callable[[LossConfig], list[str]]] = {
    "yolo": yolo_ignored_settings, "ssd": ssd_ignored_settings, "rcnn": rcnn_ignored_settings,
}

# (section, key, default) of fields added after the first shipped runs; see TrainConfig.hash.
HASH_STABLE_DEFAULTS = (
    ("model", "family", "yolo"), ("loss", "neg_pos_ratio", 3.0), ("loss", "fg_iou", 0.5),
    ("data", "min_object_px", 0.0),
)

SECTIONS = {
    "model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "loss": LossConfig, "augment": AugmentConfig,
}


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string; a command line means the number
            return float(value)
        except ValueError:
            return value
    return value


def apply_override(raw: dict[str, Any], item: str, source: str = "--set") -> None:
    """Apply one ``key.sub=value`` override to a nested dict (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"{source} {item!r}: expected key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    d = raw
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{source} {item!r}: {p!r} is not a section")
    d[parts[-1]] = _parse_value(value)


def _coerce_numbers(cls: type, section: dict[str, Any], where: str) -> dict[str, Any]:
    """Numbers YAML left as strings ("5e-4") become floats, and whole floats of int fields ints
    (``--set optim.epochs=3.0``); other type mistakes, a fraction for an int field included,
    are named (``where`` is the key's prefix: "<file>: optim." or "<file>: ")."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    out = dict(section)
    for k, v in section.items():
        d = defaults.get(k)
        if isinstance(d, bool) or not isinstance(d, (int, float)):
            if isinstance(d, bool) and not isinstance(v, bool):
                raise ConfigError(f"{where}{k} must be true or false, got {v!r}")
            continue
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError as exc:
                raise ConfigError(f"{where}{k} must be {'an integer' if isinstance(d, int) else 'a number'}, "
                                  f"got {v!r}") from exc
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ConfigError(f"{where}{k} must be a finite number, got {v!r}")
        if isinstance(d, int) and isinstance(v, float):
            if not v.is_integer():
                raise ConfigError(f"{where}{k} must be an integer, got {v!r}")
            v = int(v)
        out[k] = v
    return out


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> TrainConfig:
    """Validate a nested dict into a TrainConfig; unknown keys name the file."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a train config must be a mapping")
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"{source}: unknown config key {unknown[0]!r}; known: {sorted(top)}")
    kw = _coerce_numbers(TrainConfig, {k: v for k, v in raw.items() if k not in SECTIONS}, f"{source}: ")
    preset_name = kw.get("preset", "nano")
    if preset_name not in PRESETS:
        raise ConfigError(f"{source}: unknown preset {preset_name!r}; known: {sorted(PRESETS)}")
    for name, cls in SECTIONS.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(section) - known)
        if bad:
            raise ConfigError(f"{source}: unknown config key '{name}.{bad[0]}'; known in {name}: {sorted(known)}")
        section = _coerce_numbers(cls, section, f"{source}: {name}.")
        try:
            if name == "model":
                kw[name] = dataclasses.replace(PRESETS[preset_name], **section)
            else:
                kw[name] = cls(**section)
        except TypeError as exc:
            raise ConfigError(f"{source}: section {name!r}: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
    try:
        return TrainConfig(**kw)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML train config (or defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: malformed YAML: {str(exc).splitlines()[0]}") from exc
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw, source)
