"""The detector family and weights-only checkpoints."""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import pytest
import torch

from build_engine.checkpoint import CheckpointMeta, load_checkpoint, meta_for, save_checkpoint
from build_engine.model import ConvBNAct, ModelConfig, build_detector, preset
from build_engine.model.blocks import CSPStage, ResidualBlock
from perception.errors import ConfigError, ModelError

torch.set_num_threads(1)


class _InputSize(TypedDict):
    input_width: int
    input_height: int


SMALL: _InputSize = {"input_width": 128, "input_height": 96}


def conv_macs(model: torch.nn.Module, h: int, w: int) -> int:
    macs = 0

    def hook(mod: torch.nn.Conv2d, _i: object, out: torch.Tensor) -> None:
        nonlocal macs
        macs += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, h, w))
    for h_ in hs:
        h_.remove()
    return macs


def test_eval_output_layout_and_ranges() -> None:
    torch.manual_seed(0)
    cfg = preset("pico", **SMALL)
    m = build_detector(cfg).eval()
    out = m(torch.rand(2, 3, 96, 128))
    n = (96 // 8) * (128 // 8) + (96 // 16) * (128 // 16) + (96 // 32) * (128 // 32)
    assert out.shape == (2, n, 5 + 7)
    assert torch.all((out[..., 4:] >= 0) & (out[..., 4:] <= 1))
    assert torch.all(out[..., 2] >= out[..., 0]) and torch.all(out[..., 3] >= out[..., 1])
    # An untrained head predicts a one-stride box centred on each cell: the first cell of
    # stride 8 is centred at (4, 4).
    assert torch.allclose(out[0, 0, :4], torch.tensor([0.0, 0.0, 8.0, 8.0]), atol=1e-5)


def test_train_mode_returns_raw_maps() -> None:
    m = build_detector(preset("pico", **SMALL)).train()
    raws = m(torch.rand(2, 3, 96, 128))
    assert [tuple(r.shape) for r in raws] == [(2, 12, 12, 16), (2, 12, 6, 8), (2, 12, 3, 4)]


def test_blocks_have_conv_bn_act_and_residuals() -> None:
    m = build_detector(ModelConfig(**SMALL))
    convs = [x for x in m.modules() if isinstance(x, ConvBNAct)]
    assert convs and all(isinstance(c.conv, torch.nn.Conv2d) and isinstance(c.bn, torch.nn.BatchNorm2d) for c in convs)
    assert all(isinstance(c.act, torch.nn.ReLU) for c in convs)  # default activation
    assert any(isinstance(x, ResidualBlock) for x in m.modules())


def test_width_depth_multipliers_scale_the_family() -> None:
    macs = {name: conv_macs(build_detector(preset(name, **SMALL)), 96, 128) for name in ("pico", "nano", "small")}
    assert macs["pico"] < macs["nano"] < macs["small"]
    deep = build_detector(ModelConfig(depth_mult=1.0, **SMALL))
    shallow = build_detector(ModelConfig(depth_mult=0.33, **SMALL))
    count = lambda mm: sum(isinstance(x, ResidualBlock) for x in mm.modules())  # noqa: E731
    assert count(deep) > count(shallow)


def test_shipped_default_stays_under_a_billion_macs() -> None:
    cfg = preset("edge")  # configs/default.yaml
    macs = conv_macs(build_detector(cfg), cfg.input_height, cfg.input_width)
    assert 300e6 < macs < 800e6, macs


def test_channel_multiple_rounds_every_conv_width() -> None:
    m = build_detector(preset("edge", **SMALL))
    preds = {id(x) for h in m.heads for x in (h.cls_pred, h.box_pred, h.obj_pred)}
    widths = [x.out_channels for x in m.modules() if isinstance(x, torch.nn.Conv2d) and id(x) not in preds]
    assert widths and all(w % 16 == 0 for w in widths), widths
    # The default multiple of 8 leaves nano exactly as it was trained and shipped before.
    nano = build_detector(preset("nano", **SMALL))
    stage = nano.backbone.stage1[1]
    assert isinstance(stage, CSPStage)
    assert stage.cv1.conv.out_channels == 8


@pytest.mark.parametrize("bad", [dict(input_width=100), dict(act="gelu"), dict(width_mult=0.0), dict(num_classes=0),
                                 dict(channel_multiple=12)])
def test_bad_model_config_is_rejected(bad: dict) -> None:
    with pytest.raises(ConfigError):
        ModelConfig(**bad)


def test_onnx_export_dynamic_batch_matches_torch(tmp_path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    m = build_detector(preset("pico", **SMALL)).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(m, (torch.rand(1, 3, 96, 128),), str(path), opset_version=17, input_names=["images"],
                      output_names=["output"], dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}},
                      dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        x = torch.rand(b, 3, 96, 128)
        got = sess.run(None, {"images": x.numpy()})[0]
        np.testing.assert_allclose(got, m(x).detach().numpy(), atol=1e-4)


def test_checkpoint_roundtrip_weights_only(tmp_path) -> None:
    torch.manual_seed(1)
    m = build_detector(preset("pico", **SMALL)).eval()
    path = save_checkpoint(tmp_path / "c.pt", m, meta_for(m, epoch=3, val_kpi={"map50": 0.5}))
    raw = torch.load(path, weights_only=True)  # no pickled classes
    assert raw["meta"]["epoch"] == 3
    m2, meta = load_checkpoint(path)
    assert isinstance(meta, CheckpointMeta) and meta.val_kpi == {"map50": 0.5} and not m2.training
    assert meta.config == m.cfg and meta.input_size == (128, 96)
    x = torch.rand(1, 3, 96, 128)
    assert torch.equal(m(x), m2(x))


def test_missing_or_corrupt_checkpoint_is_a_one_line_model_error(tmp_path) -> None:
    with pytest.raises(ModelError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="bad.pt") as ei:
        load_checkpoint(bad)
    assert "\n" not in str(ei.value)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ModelError, match="other.pt"):
        load_checkpoint(other)


def test_half_checkpoint_is_smaller_and_loads_as_fp32(tmp_path) -> None:
    torch.manual_seed(0)
    m = build_detector(preset("pico", **SMALL)).eval()
    full = save_checkpoint(tmp_path / "full.pt", m, meta_for(m))
    half = save_checkpoint(tmp_path / "half.pt", m, meta_for(m), half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.state_dict().values() if p.is_floating_point())
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        assert torch.allclose(loaded(x), m(x), atol=0.05)
    payload = torch.load(half, weights_only=True)
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values() if v.is_floating_point())


def test_training_the_yolo_family_with_softmax_ce_is_refused() -> None:
    """Its graph reads class scores through a sigmoid: CE-trained logits would serve arbitrary scores."""
    from build_engine.losses import LossConfig

    m = build_detector(preset("pico", **SMALL)).train()
    targets = [(torch.tensor([[10.0, 10.0, 40.0, 50.0]]), torch.tensor([1]))]
    with pytest.raises(ConfigError, match="use bce or focal"):
        m.training_loss(torch.rand(1, 3, 96, 128), targets, LossConfig(cls_loss="ce"))
    loss, _ = m.training_loss(torch.rand(1, 3, 96, 128), targets, LossConfig(cls_loss="focal"))
    assert torch.isfinite(loss)
