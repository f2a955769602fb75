"""MAC / param profiler: hand-computed layers, a published figure, the CLI and its errors."""

from __future__ import annotations

import json

import pytest
from torch import nn

from build_engine.profile import load_model_spec, parse_input_shape, profile_model
from perception.errors import ConfigError, InvalidInputError


def _by_name(result, name):
    return next(r for r in result.layers if r.name == name)


def test_conv_macs_hand_computed_including_groups():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),  # 16 x 16x16 out, k 3x3, ic 3
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),  # depthwise
        nn.Conv2d(16, 32, 1, groups=4, bias=False),  # grouped pointwise
    )
    r = profile_model(model, (1, 3, 32, 32))
    assert _by_name(r, "0").macs == 16 * 16 * 16 * 3 * 3 * 3
    assert _by_name(r, "0").params == 16 * 3 * 9 + 16
    assert _by_name(r, "0").output_shape == (1, 16, 16, 16)
    # Without the groups term this would be 16x too many.
    assert _by_name(r, "1").macs == 16 * 16 * 16 * 3 * 3 * 1
    assert _by_name(r, "2").macs == 32 * 16 * 16 * 1 * 1 * (16 // 4)
    assert r.total_macs == sum(x.macs for x in r.layers)
    assert r.total_flops == 2 * r.total_macs


def test_linear_norm_other_and_batch():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5), nn.ReLU())
    r = profile_model(model, (2, 3, 2, 2))
    assert _by_name(r, "1").macs == 2 * 5 * 12  # batch 2 counted: MACs are for the whole input
    assert _by_name(r, "2").kind == "norm" and _by_name(r, "2").macs == 2 * 5
    assert _by_name(r, "3").macs == 0 and _by_name(r, "3").output_shape == (2, 5)
    assert r.total_params == 12 * 5 + 5 + 2 * 5


def test_reused_module_counted_per_call_params_once():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1, bias=False)

        def forward(self, x):
            return self.conv(self.conv(x))

    r = profile_model(Twice(), (1, 4, 8, 8))
    assert [x.name for x in r.layers] == ["conv", "conv#1"]
    assert r.total_macs == 2 * 4 * 8 * 8 * 4
    assert sum(x.params for x in r.layers) == r.total_params == 16


# --- MobileNetV2 (Sandler et al. 2018), defined here: ~300 M MACs and 3.4 M params at 224 ---


def _cbr(i, o, k=3, s=1, g=1):
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU6())


class _InvRes(nn.Module):
    def __init__(self, i, o, s, t):
        super().__init__()
        h = i * t
        layers = [] if t == 1 else [_cbr(i, h, 1)]
        layers += [_cbr(h, h, 3, s, h), nn.Conv2d(h, o, 1, bias=False), nn.BatchNorm2d(o)]
        self.conv = nn.Sequential(*layers)
        self.res = s == 1 and i == o

    def forward(self, x):
        return x + self.conv(x) if self.res else self.conv(x)


def mobilenet_v2() -> nn.Module:
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers, c = [_cbr(3, 32, 3, 2)], 32
    for t, o, n, s in cfg:
        for i in range(n):
            layers.append(_InvRes(c, o, s if i == 0 else 1, t))
            c = o
    layers.append(_cbr(c, 1280, 1))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000))


def test_mobilenet_v2_published_figures():
    r = profile_model(mobilenet_v2(), (1, 3, 224, 224))
    # Published: 300 M multiply-adds, 3.4 M parameters (MobileNetV2 paper, table 3).
    assert 295e6 < r.conv_linear_macs < 305e6, r.conv_linear_macs
    assert 3.4e6 < r.total_params < 3.6e6, r.total_params
    assert r.total_macs > r.conv_linear_macs  # BN layers add their per-element MACs


def test_parse_input_shape():
    assert parse_input_shape("1x3x288x512") == (1, 3, 288, 512)
    for bad in ("3x288x512", "1x3x288x512x1", "1xAx2x2", "0x3x2x2"):
        with pytest.raises(InvalidInputError):
            parse_input_shape(bad)


def test_load_model_spec_errors():
    with pytest.raises(ConfigError):
        load_model_spec("no_such_module_xyz:factory")
    with pytest.raises(ConfigError):
        load_model_spec("tests.build_engine.test_profile:no_such_factory")
    with pytest.raises(ConfigError):
        load_model_spec("not-a-spec")
    assert isinstance(load_model_spec("torch.nn:Identity"), nn.Identity)


def test_cli_json_and_errors(capsys, tmp_path):
    from perception.cli import main

    argv = ["profile", "--model", "tests.build_engine.test_profile:mobilenet_v2", "--input", "1x3x96x96", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_macs"] > 0 and out["total_params"] > 3.4e6
    assert out["total_flops"] == 2 * out["total_macs"]
    assert "MAC" in out["units"]["macs"] or "multiply" in out["units"]["macs"]
    assert main(["profile", "--model", "torch.nn:Identity", "--input", "3x96x96"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rank 3" in err[0]
    assert main(["profile", "--model", "nope_module:f", "--input", "1x3x8x8"]) != 0
    assert "cannot import" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["profile", "--model", str(bad), "--input", "1x3x64x64"]) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["profile", "--model", str(tmp_path / "missing.pt"), "--input", "1x3x64x64"]) != 0
    assert "no such checkpoint" in capsys.readouterr().err


def tiny_rcnn() -> nn.Module:
    from build_engine.model import preset
    from build_engine.model.rcnn import RcnnDetector

    return RcnnDetector(preset("pico", family="rcnn", input_width=128, input_height=96))


def test_cli_counts_a_two_stage_model_as_the_manifest_does(capsys):
    """A profile of one forward counts the box head only for the proposals an all-zeros image
    makes, and RoIAlign not at all; the CLI's total is the manifest's, with both at the proposal
    maximum (``profile.two_stage_macs``), and names the one input shape it holds for."""
    from build_engine.profile import two_stage_macs
    from perception.cli import main

    spec = "tests.build_engine.test_profile:tiny_rcnn"
    assert main(["profile", "--model", spec, "--input", "1x3x96x128", "--fold-bn", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = two_stage_macs(tiny_rcnn())  # of the BN-folded model, as the build counts it
    assert out["total_macs"] == want and out["total_flops"] == 2 * want
    assert "100 proposals" in out["note"]
    assert main(["profile", "--model", spec, "--input", "1x3x96x128", "--fold-bn"]) == 0
    text = capsys.readouterr().out
    assert f"total {want / 1e6:.2f}M MACs" in text and "100 proposals" in text
    assert main(["profile", "--model", spec, "--input", "2x3x96x128"]) != 0
    assert "use --input 1x3x96x128" in capsys.readouterr().err
