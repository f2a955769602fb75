"""BatchNorm folding: the formula on one layer and the whole detector on real images. (That no
exported variant holds a BatchNormalization node is checked in test_export / test_build.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from build_engine.fold import count_batchnorm, fold_batchnorm, fuse_conv_bn


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            assert m.running_mean is not None and m.running_var is not None  # tracked by default
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.05)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)


@pytest.mark.parametrize("groups,bias", [(1, False), (1, True), (8, False)])
def test_fuse_conv_bn_formula(groups, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(8, eps=1e-3)
    seq = nn.Sequential(conv, bn)
    _randomise_bn(seq)
    seq.eval()
    fused = fuse_conv_bn(conv, bn)
    x = torch.randn(2, 8, 10, 10)
    torch.testing.assert_close(fused(x), seq(x), atol=1e-5, rtol=1e-5)
    # w' = gamma * w / sqrt(var + eps), per output channel
    assert bn.running_var is not None
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(fused.weight, conv.weight * s.reshape(-1, 1, 1, 1))


def test_fold_sequential_and_leaves_original_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    _randomise_bn(model)
    folded, n = fold_batchnorm(model)
    assert n == 2 and count_batchnorm(folded) == 0 and count_batchnorm(model) == 2
    x = torch.randn(1, 3, 12, 12)
    torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def _real_batch(n: int, width: int, height: int) -> torch.Tensor:
    """Rendered road scenes through the serving pre-processing."""
    from build_engine.data.scene import random_image
    from perception.manifest import PreprocessSpec
    from perception.preprocess import preprocess_batch

    images = [random_image(4242 + i, 320, 180).image for i in range(n)]
    batch, _ = preprocess_batch(images, PreprocessSpec(input_width=width, input_height=height))
    return torch.from_numpy(batch)


def test_fold_detector_matches_on_real_images():
    from build_engine.model import build_detector, preset
    from build_engine.model.detector import HeadLevel

    torch.manual_seed(0)
    cfg = preset("pico", input_width=192, input_height=128)
    model = build_detector(cfg)
    x = _real_batch(3, cfg.input_width, cfg.input_height)
    # Real BN statistics: a few train-mode passes over real images, then randomised affine.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    for head in model.heads:  # a non-degenerate box branch (zero-initialised in the model)
        assert isinstance(head, HeadLevel)
        nn.init.normal_(head.box_pred.weight, std=0.05)
    model.eval()
    folded, n = fold_batchnorm(model)
    assert n > 20 and count_batchnorm(folded) == 0
    with torch.no_grad():
        ref, out = model(x), folded(x)
    probs_err = (ref[..., 4:] - out[..., 4:]).abs().max().item()
    box_rel = ((ref[..., :4] - out[..., :4]).abs() / ref[..., :4].abs().clamp(min=1.0)).max().item()
    assert probs_err <= 1e-4 and box_rel <= 1e-4, (probs_err, box_rel)
    assert ref[..., :4].std() > 1.0  # the comparison is not between two constant tensors
