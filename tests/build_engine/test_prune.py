"""Structured pruning: physically fewer channels, whole blocks removed, consistent residual /
concat groups (the pruned model runs and exports), checkpoint round trip, fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from build_engine.model.blocks import ConvBNAct, ResidualBlock
from build_engine.model.detector import Detector, HeadLevel
from build_engine.prune import (
    PruneOptions,
    conv_channels,
    prune_model,
    removable_blocks,
)
from build_engine.pruned_checkpoint import load_any_checkpoint
from perception.errors import ConfigError

W, H = 128, 96


def _model() -> Detector:
    from tests.build_engine.test_quantize import _tiny_detector

    return _tiny_detector()


def _images(n: int = 4) -> torch.Tensor:
    from build_engine.data.scene import random_image
    from perception.manifest import PreprocessSpec
    from perception.preprocess import preprocess_batch

    images = [random_image(77 + i, 320, 180).image for i in range(n)]
    batch, _ = preprocess_batch(images, PreprocessSpec(input_width=W, input_height=H))
    return torch.from_numpy(batch)


def test_prune_removes_channels_and_blocks_physically():
    from build_engine.profile import profile_model

    model = _model()
    x = _images()
    blocks = removable_blocks(model)
    assert len(blocks) >= 4  # the backbone's residual blocks
    pruned, info = prune_model(model, x, PruneOptions(ratio=0.5, remove_blocks=2))
    assert len(info["removed_blocks"]) == 2 and set(info["removed_blocks"]) <= set(blocks)
    for name in info["removed_blocks"]:
        with pytest.raises(AttributeError):
            pruned.get_submodule(name)
    assert info["channels_after"] == conv_channels(pruned) < 0.75 * conv_channels(model)
    # The widest stage really lost channels, its BN with it (pico's 8-channel stem stays: round_to=8).
    assert isinstance(pruned, Detector)
    new_down, old_down = pruned.backbone.stage4[0], model.backbone.stage4[0]
    assert isinstance(new_down, ConvBNAct) and isinstance(old_down, ConvBNAct)
    c_new, c_old = new_down.conv.out_channels, old_down.conv.out_channels
    assert c_new <= 0.5 * c_old and c_new % 8 == 0
    assert new_down.bn.num_features == c_new
    # The output layout is untouched: same candidates, 5 + 7 channels.
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (4, 12 * 16 + 6 * 8 + 3 * 4, 12)
    before, after = profile_model(model, (1, 3, H, W)), profile_model(pruned, (1, 3, H, W))
    assert after.total_macs < 0.5 * before.total_macs and after.total_params < 0.5 * before.total_params
    assert model.backbone.stem.conv.out_channels == 8  # the original is left intact


def test_block_removal_picks_the_most_identity_like_block():
    from build_engine.prune import block_contributions

    model = _model()
    names = removable_blocks(model)
    target = names[1]
    blk = model.get_submodule(target)
    assert isinstance(blk, ResidualBlock)
    nn.init.zeros_(blk.cv2.bn.weight)  # this block now outputs exactly its input
    nn.init.zeros_(blk.cv2.bn.bias)
    scores = block_contributions(model, names, _images(2))
    assert scores[target] == pytest.approx(0.0, abs=1e-6)
    _, info = prune_model(model, _images(2), PruneOptions(ratio=0.0, remove_blocks=1))
    assert info["removed_blocks"] == [target]


def test_pruned_checkpoint_round_trip_and_export(tmp_path):
    import numpy as np

    from build_engine.checkpoint import meta_for, save_checkpoint
    from build_engine.export import export_onnx, op_types
    from build_engine.fold import fold_batchnorm
    from server.runtime.onnxruntime_backend import OnnxRuntimeBackend

    model = _model()
    x = _images(2)
    pruned, info = prune_model(model, x, PruneOptions(ratio=0.4, importance="bn"))
    path = save_checkpoint(tmp_path / "p.pt", pruned, meta_for(pruned, extra={"pruned": info}))
    loaded, meta = load_any_checkpoint(path)
    assert meta.extra["pruned"]["ratio"] == 0.4
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x))
    folded, _ = fold_batchnorm(loaded)
    onnx_path = export_onnx(folded, tmp_path / "p.onnx", (H, W))
    assert "BatchNormalization" not in op_types(onnx_path)
    b = OnnxRuntimeBackend(onnx_path, intra_op_threads=1)
    b.activate()
    np.testing.assert_allclose(b.infer(x.numpy())["output"], pruned(x).detach().numpy(), rtol=1e-3, atol=1e-3)


def test_prune_options_validated():
    with pytest.raises(ConfigError):
        PruneOptions(ratio=1.0)
    with pytest.raises(ConfigError):
        PruneOptions(ratio=0.3, importance="random")


def test_finetune_updates_weights_with_the_training_code(tmp_path):
    from build_engine.config import config_from_dict
    from build_engine.prune import finetune

    cfg = config_from_dict({
        "preset": "pico", "threads": 1,
        "model": {"input_width": W, "input_height": H},
        "data": {"cache_dir": str(tmp_path / "cache"), "train_images": 8, "val_images": 4,
                 "image_width": 320, "image_height": 180},
        "optim": {"batch_size": 4, "epochs": 1, "ema": False},
    })
    pruned, _ = prune_model(_model(), _images(2), PruneOptions(ratio=0.3, remove_blocks=0))
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    from perception.errors import ConfigError

    with pytest.raises(ConfigError, match="not the model's"):  # data of other classes: refused before training
        finetune(pruned, cfg, epochs=1, lr=0.01, progress=False, classes=("truck", "car"))
    kpi = finetune(pruned, cfg, epochs=1, lr=0.01, progress=False)
    assert set(kpi) >= {"map50_95", "map50", "precision", "recall"}
    changed = [k for k, v in pruned.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert len(changed) > 10
    assert not pruned.training


def test_prune_cli(tmp_path, capsys):
    from build_engine.checkpoint import meta_for, save_checkpoint
    from perception.cli import main

    model = _model()
    ckpt = save_checkpoint(tmp_path / "d.pt", model, meta_for(model))
    out = tmp_path / "pruned.pt"
    assert main(["prune", "--checkpoint", str(ckpt), "--ratio", "0.5", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["macs_after"] < res["macs_before"] and res["channels_after"] < res["channels_before"]
    loaded, loaded_meta = load_any_checkpoint(out)
    assert loaded_meta.val_kpi == {}, "not fine-tuned: no accuracy measured, not the parent's passed on"
    assert conv_channels(loaded) == res["channels_after"]
    assert main(["prune", "--checkpoint", str(tmp_path / "missing.pt"), "--ratio", "0.5",
                 "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such checkpoint" in err[0]
    assert not (tmp_path / "x.pt").exists()


def test_pruning_a_pruned_checkpoint_keeps_its_removed_blocks(tmp_path, capsys):
    from build_engine.checkpoint import meta_for, save_checkpoint
    from perception.cli import main

    model = _model()
    ckpt = save_checkpoint(tmp_path / "d.pt", model, meta_for(model))
    assert main(["prune", "--checkpoint", str(ckpt), "--ratio", "0.3", "--remove-blocks", "1",
                 "--out", str(tmp_path / "p1.pt")]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["prune", "--checkpoint", str(tmp_path / "p1.pt"), "--ratio", "0", "--remove-blocks", "1",
                 "--out", str(tmp_path / "p2.pt")]) == 0
    second = json.loads(capsys.readouterr().out)
    assert len(second["removed_blocks"]) == 2 and second["removed_blocks"][0] == first["removed_blocks"][0]
    loaded, meta = load_any_checkpoint(tmp_path / "p2.pt")
    assert conv_channels(loaded) == second["channels_after"] and meta.extra["pruned"]["previous"]["ratio"] == 0.3
    assert main(["prune", "--checkpoint", str(tmp_path / "p2.pt"), "--ratio", "0", "--remove-blocks", "0",
                 "--out", str(tmp_path / "p3.pt")]) == 0
    _, meta = load_any_checkpoint(tmp_path / "p3.pt")
    assert meta.extra["pruned"]["previous"]["previous"]["ratio"] == 0.3  # the original step survives a third pass


def test_finetune_trains_at_the_model_input_size_whatever_the_config_says(tmp_path):
    """A checkpoint trained at one size, fine-tuned with a config written for another, must
    see images at its own size (the head's anchor grid is built for it)."""
    import copy

    from build_engine.config import config_from_dict
    from build_engine.prune import finetune

    def cfg(w: int, h: int):
        return config_from_dict({
            "preset": "pico", "threads": 1,
            "model": {"input_width": w, "input_height": h},
            "data": {"cache_dir": str(tmp_path / "cache"), "train_images": 8, "val_images": 4,
                     "image_width": 320, "image_height": 180},
            "optim": {"batch_size": 4, "epochs": 1, "ema": False},
        })

    pruned, _ = prune_model(_model(), _images(2), PruneOptions(ratio=0.3, remove_blocks=0))
    a, b = copy.deepcopy(pruned), copy.deepcopy(pruned)
    finetune(a, cfg(W, H), epochs=1, lr=0.01, progress=False)
    finetune(b, cfg(W * 2, H * 2), epochs=1, lr=0.01, progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), f"{k} differs: the mismatched config changed what was trained"


def test_finetune_with_a_teacher_pulls_the_student_towards_it(tmp_path):
    """Distillation from the unpruned parent: with the detection loss's weight dwarfed, the
    student's raw maps end closer to the teacher's than they started, and closer than the same
    fine-tune without the teacher leaves them."""
    import copy

    from build_engine.config import config_from_dict
    from build_engine.losses import distillation_loss
    from build_engine.prune import finetune

    cfg = config_from_dict({
        "preset": "pico", "threads": 1,
        "model": {"input_width": W, "input_height": H},
        "data": {"cache_dir": str(tmp_path / "cache"), "train_images": 16, "val_images": 4,
                 "image_width": 320, "image_height": 180},
        "optim": {"batch_size": 4, "epochs": 1, "ema": False},
        "loss": {"cls_weight": 1e-4, "box_weight": 1e-4, "obj_weight": 1e-4},
    })
    teacher = _model().eval()
    student, _ = prune_model(teacher, _images(2), PruneOptions(ratio=0.3, remove_blocks=0))
    assert isinstance(student, Detector)
    with torch.no_grad():  # start the student visibly away from the teacher's outputs
        for h in student.heads:
            assert isinstance(h, HeadLevel)
            assert h.box_pred.bias is not None and h.obj_pred.bias is not None
            h.box_pred.bias.add_(0.5)
            h.obj_pred.bias.add_(2.0)
    x = _images(2)
    with torch.no_grad():
        target = teacher.forward_raw(x)
        before = distillation_loss(student.forward_raw(x), target).item()
    untouched = copy.deepcopy(teacher.state_dict())
    taught, alone = copy.deepcopy(student), copy.deepcopy(student)
    finetune(taught, cfg, epochs=2, lr=0.02, progress=False, teacher=teacher, distill_weight=1.0)
    finetune(alone, cfg, epochs=2, lr=0.02, progress=False)
    with torch.no_grad():
        after = distillation_loss(taught.forward_raw(x), target).item()
        after_alone = distillation_loss(alone.forward_raw(x), target).item()
    # Without the teacher the student drifts; with it, it closes part of the gap in 8 steps.
    assert after < 0.97 * before and after < 0.97 * after_alone, (before, after, after_alone)
    assert all(torch.equal(v, untouched[k]) for k, v in teacher.state_dict().items())  # the teacher stays frozen
