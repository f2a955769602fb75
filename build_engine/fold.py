"""BatchNorm folding: Conv + BN (+ activation) fused into one Conv with a bias.

For a convolution ``y = w * x + b`` followed by an inference-mode BatchNorm
``z = gamma * (y - mean) / sqrt(var + eps) + beta`` the fused convolution has

    w' = gamma * w / sqrt(var + eps)            (per output channel)
    b' = gamma * (b - mean) / sqrt(var + eps) + beta

so the BN disappears from the graph (no ``BatchNormalization`` node in any exported variant)
and the activation, if any, follows the fused convolution unchanged.

Two shapes are recognised: a module holding ``.conv`` (Conv2d) and ``.bn`` (BatchNorm2d)
attributes, the ``ConvBNAct`` block of the model package; and a Conv2d immediately followed
by a BatchNorm2d inside an ``nn.Sequential``.
"""

from __future__ import annotations

import copy
import itertools
import logging

import torch
from torch import nn

from perception.errors import ModelError

log = logging.getLogger(__name__)


def _pair(v: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's stored size (typed ``tuple[int, ...]``) as the 2-tuple its constructor takes."""
    a, b = v
    return a, b


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d equal to ``bn(conv(x))`` in inference mode (uses BN running statistics).

    Weights (OC, IC/groups, KH, KW) are scaled per output channel; the bias is always present.
    """
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        raise ModelError(f"cannot fuse {type(conv).__name__} with {type(bn).__name__}")
    if conv.out_channels != bn.num_features:
        raise ModelError(f"conv has {conv.out_channels} output channels but BN has {bn.num_features}")
    if bn.running_mean is None or bn.running_var is None:
        raise ModelError("BatchNorm without running statistics (track_running_stats=False) cannot be folded")
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        _pair(conv.kernel_size),
        stride=_pair(conv.stride),
        padding=conv.padding if isinstance(conv.padding, str) else _pair(conv.padding),
        dilation=_pair(conv.dilation),
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device)
    assert fused.bias is not None  # built with bias=True; nn.Conv2d types its bias as optional
    with torch.no_grad():
        # Computed in float64: folding tiny variances in float32 loses the 1e-4 match.
        w = conv.weight.double()
        b = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones(bn.num_features, dtype=torch.float64)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros(bn.num_features, dtype=torch.float64)
        inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
        scale = gamma * inv_std
        fused.weight.copy_((w * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype))
        fused.bias.copy_((scale * (b - bn.running_mean.double()) + beta).to(conv.weight.dtype))
    return fused


def _fold_in_place(module: nn.Module) -> int:
    count = 0
    conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
    if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
        module.conv = fuse_conv_bn(conv, bn)
        module.bn = nn.Identity()
        count += 1
    if isinstance(module, nn.Sequential):
        names = list(module._modules.keys())
        for first, second in itertools.pairwise(names):
            a, b = module._modules[first], module._modules[second]
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                module._modules[first] = fuse_conv_bn(a, b)
                module._modules[second] = nn.Identity()
                count += 1
    for child in module.children():
        count += _fold_in_place(child)
    return count


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, int]:
    """Fold every recognised Conv+BN pair; return (eval-mode model, number of folded pairs).

    Works on a deep copy unless ``inplace``. A BatchNorm2d left over (one not preceded by a
    convolution) is logged: it would become a BatchNormalization node in the export.
    """
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    n = _fold_in_place(target)
    leftover = [name for name, m in target.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if leftover:
        log.warning("%d BatchNorm layers could not be folded: %s", len(leftover), leftover[:5])
    log.debug("folded %d Conv+BN pairs", n)
    return target, n


def count_batchnorm(model: nn.Module) -> int:
    """Number of BatchNorm modules left in ``model``."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
