"""The train config's validation: numbers of the right kind and range, named, at load; and loss
settings a detector family does not read, refused for that family."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from build_engine.config import OptimConfig, TrainConfig, load_config
from build_engine.losses import LossConfig
from build_engine.model import build_model
from build_engine.model.config import ModelConfig
from perception.errors import ConfigError


def _refused(overrides: list[str], *names: str) -> str:
    """The one-line ConfigError ``overrides`` give, checked to name each of ``names``."""
    with pytest.raises(ConfigError) as ei:
        load_config(None, overrides)
    msg = str(ei.value)
    assert len(msg.splitlines()) == 1 and all(n in msg for n in names), msg
    return msg


@pytest.mark.parametrize("override, key", [
    ("optim.lr=nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"), ("optim.lr=inf", "optim.lr"),
    ("loss.cls_weight=nan", "loss.cls_weight"), ("loss.box_weight=.inf", "loss.box_weight"),
    ("optim.grad_clip=nan", "optim.grad_clip"), ("augment.flip=nan", "augment.flip"),
    ("optim.warmup_epochs=.inf", "optim.warmup_epochs"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, key) -> None:
    """``nan <= 0`` is false and ``inf >= 0`` true: NaN / inf passed every range check and
    trained on NaN."""
    assert "finite" in _refused([override], key)


@pytest.mark.parametrize("override, key", [
    ("optim.epochs=2.5", "optim.epochs"), ("optim.batch_size=2.5", "optim.batch_size"),
    ("data.train_images=10.5", "data.train_images"), ("model.num_classes=2.5", "model.num_classes"),
    ("threads=1.5", "threads"), ("eval_every=1.5", "eval_every"), ("seed=abc", "seed"),
])
def test_a_fraction_for_an_int_field_is_refused_naming_the_key(override, key) -> None:
    """2.5 epochs was kept and failed later in range() with a Python error."""
    assert "integer" in _refused([override], key)


def test_top_level_settings_are_coerced_and_checked_like_the_sections() -> None:
    """score_threshold=abc failed after a whole epoch, at the first validation; 1.5 was taken."""
    _refused(["score_threshold=abc"], "score_threshold", "number")
    _refused(["score_threshold=1.5"], "score_threshold", "[0, 1]")
    _refused(["seed=-1"], "seed")  # numpy's generators take no negative seed
    cfg = load_config(None, ["threads=1.0", "seed=3", "score_threshold=0.5", "eval_every=2e0"])
    assert (cfg.threads, cfg.seed, cfg.score_threshold, cfg.eval_every) == (1, 3, 0.5, 2)
    assert isinstance(cfg.threads, int) and isinstance(cfg.eval_every, int)
    with pytest.raises(ConfigError, match="optim.epochs must be an integer"):
        OptimConfig(epochs=2.5)  # type: ignore[arg-type]  # constructed directly, not loaded
    with pytest.raises(ConfigError, match="score_threshold"):
        TrainConfig(score_threshold=math.nan)


@pytest.mark.parametrize("overrides, key", [
    (["optim.weight_decay=-0.1"], "optim.weight_decay"),  # torch checks no per-group decay: weights grow
    (["optim.momentum=1.5"], "optim.momentum"),
    (["optim.optimizer=adamw", "optim.momentum=1.5"], "optim.momentum"),  # torch's error named a beta
    (["optim.warmup_bias_lr=-5"], "optim.warmup_bias_lr"),
    (["loss.obj_focal=true", "loss.focal_alpha=2"], "loss.focal_alpha"),  # a negative loss for negatives
    (["augment.min_visible=5"], "augment.min_visible"),  # dropped every target
    (["augment.translate=-3"], "augment.translate"),
    (["augment.hsv_v=2"], "augment.hsv_v"),
    (["augment.min_box_px=-1"], "augment.min_box_px"),
])
def test_out_of_range_values_are_refused_before_the_optimizer_or_loss(overrides, key) -> None:
    _refused(overrides, key)


def test_range_edges_are_where_the_settings_say() -> None:
    cfg = load_config(None, ["optim.optimizer=adamw", "optim.momentum=0", "optim.weight_decay=0",
                             "loss.obj_focal=true", "loss.focal_alpha=-1",  # negative: no alpha weighting
                             "augment.min_visible=1", "augment.translate=0", "optim.grad_clip=0"])
    assert cfg.optim.momentum == 0 and cfg.loss.focal_alpha == -1
    _refused(["optim.optimizer=sgd", "optim.momentum=0"], "optim.momentum", "Nesterov")  # torch refuses 0
    _refused(["loss.obj_focal=true", "loss.focal_alpha=1.01"], "loss.focal_alpha")
    _refused(["augment.min_visible=1.01"], "augment.min_visible")


@pytest.mark.parametrize("family, overrides, named", [
    ("rcnn", ["loss.cls_loss=focal"], ["loss.cls_loss=focal"]),
    ("rcnn", ["loss.focal_gamma=5", "loss.focal_alpha=0.9"], ["loss.focal_gamma=5", "loss.focal_alpha=0.9"]),
    ("rcnn", ["loss.l1_weight=3"], ["loss.l1_weight=3"]),
    ("rcnn", ["loss.neg_pos_ratio=9"], ["loss.neg_pos_ratio=9"]),
    ("ssd", ["loss.obj_weight=7"], ["loss.obj_weight=7"]),
    ("ssd", ["loss.obj_focal=true", "loss.center_radius=9"], ["loss.obj_focal=True", "loss.center_radius=9"]),
    ("ssd", ["loss.focal_gamma=1"], ["loss.focal_gamma=1"]),  # read with cls_loss focal only
    ("ssd", ["loss.box_loss=smooth_l1", "loss.l1_weight=1"], ["loss.l1_weight=1"]),
    ("yolo", ["loss.fg_iou=0.9"], ["loss.fg_iou=0.9"]),
    ("yolo", ["loss.neg_pos_ratio=9"], ["loss.neg_pos_ratio=9"]),
    ("yolo", ["loss.focal_alpha=0.5"], ["loss.focal_alpha=0.5"]),  # quality focal has no alpha
])
def test_loss_settings_the_family_does_not_read_are_refused(repo_root, family, overrides, named) -> None:
    """They parsed and changed nothing: a run was not what its config said."""
    _refused(["model.family=" + family, "loss.cls_loss=" + ("bce" if family == "yolo" else "ce")] + overrides,
             f"the {family} family does not read", *named)


def test_what_each_family_reads_is_accepted_and_the_shipped_configs_load(repo_root, capsys) -> None:
    from perception.cli import main

    for family, overrides in [
        ("rcnn", ["loss.cls_loss=bce", "loss.obj_focal=true", "loss.focal_gamma=1"]),  # the proposals' objectness
        ("ssd", ["loss.cls_loss=focal", "loss.focal_gamma=1", "loss.focal_alpha=0.5"]),
        ("ssd", ["loss.cls_loss=ce", "loss.neg_pos_ratio=5", "loss.l1_weight=1"]),  # l1 beside CIoU
        ("yolo", ["loss.cls_loss=focal", "loss.focal_gamma=1", "loss.center_radius=1"]),
    ]:
        load_config(None, [f"model.family={family}"] + overrides)
    # The ssd loss has no bce: refused at load, not at the first batch.
    _refused(["model.family=ssd"], "loss.cls_loss")
    shipped = sorted((repo_root / "configs").glob("*.yaml"))
    assert {p.name for p in shipped} >= {"default.yaml", "ssd.yaml", "rcnn.yaml"}
    for path in shipped:
        load_config(path)
    with pytest.raises(SystemExit) as ei:
        main(["train", "--help"])
    assert ei.value.code == 0 and "--config" in capsys.readouterr().out


# One value off the default per loss setting, each valid in every base below.
PERTURB: dict[str, Any] = {
    "cls_loss": "focal", "box_loss": "giou", "cls_weight": 2.0, "box_weight": 2.0, "obj_weight": 2.0,
    "l1_weight": 1.0, "focal_gamma": 1.0, "focal_alpha": 0.5, "center_radius": 0.25, "obj_focal": True,
    "neg_pos_ratio": 1.0, "fg_iou": 0.7,
}


@pytest.mark.parametrize("family, base", [
    ("yolo", {}), ("yolo", {"cls_loss": "focal", "obj_focal": True}),
    ("ssd", {"cls_loss": "ce"}), ("ssd", {"cls_loss": "focal"}),
    ("rcnn", {"cls_loss": "ce"}), ("rcnn", {"cls_loss": "ce", "obj_focal": True}),
])
def test_a_setting_is_refused_exactly_when_it_changes_nothing(family, base) -> None:
    """Keeps the families' lists of unread settings true to their losses: every loss setting,
    moved off its base value, changes the family's loss on a tiny batch unless the family's
    check refuses it."""
    from build_engine.config import IGNORED_LOSS_SETTINGS

    torch.set_num_threads(1)
    model_cfg = ModelConfig(family=family, num_classes=2, width_mult=0.125, input_width=128, input_height=96)
    torch.manual_seed(0)
    model = build_model(model_cfg).train()
    images = torch.rand(2, 3, 96, 128)
    targets = [(torch.tensor([[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]]), torch.tensor([0, 1])),
               (torch.tensor([[30.0, 30.0, 70.0, 80.0]]), torch.tensor([1]))]

    def loss(cfg: LossConfig) -> float:
        torch.manual_seed(1)  # the two-stage family samples RoIs with the global RNG
        with torch.no_grad():
            return float(model.training_loss(images, targets, cfg)[0])  # type: ignore[operator]  # family contract

    base_cfg = LossConfig(**base)
    assert IGNORED_LOSS_SETTINGS[family](base_cfg) == []
    reference = loss(base_cfg)
    for name, value in PERTURB.items():
        if name in base:
            continue
        cfg = dataclasses.replace(base_cfg, **{name: value})
        refused = any(s.startswith(f"loss.{name}=") for s in IGNORED_LOSS_SETTINGS[family](cfg))
        assert refused == (loss(cfg) == reference), (family, base, name)
