"""Building blocks: Conv-BN-activation, a residual bottleneck and a CSP stage of them.

``ConvBNAct`` keeps ``.conv``, ``.bn`` and ``.act`` as attributes so BN folding and channel
pruning can find them by structure.
"""

from __future__ import annotations

import torch
from torch import nn


def make_act(name: str) -> nn.Module:
    """The activation module for a name in build_engine.model.config.ACTIVATIONS."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1, inplace=True)
    if name == "silu":
        return nn.SiLU(inplace=True)
    if name == "hardswish":
        return nn.Hardswish(inplace=True)
    raise ValueError(f"unknown activation {name!r}")


class ConvBNAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> activation; 'same' padding for odd kernels."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, act: str = "relu", groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    """1x1 -> 3x3 bottleneck with an identity shortcut (removable as a unit by block pruning)."""

    def __init__(self, c: int, act: str = "relu", shortcut: bool = True, expansion: float = 1.0) -> None:
        super().__init__()
        hidden = max(8, int(c * expansion))
        self.cv1 = ConvBNAct(c, hidden, 1, 1, act)
        self.cv2 = ConvBNAct(hidden, c, 3, 1, act)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class CSPStage(nn.Module):
    """Cross-stage-partial stage: split into two 1x1 branches, run ``n`` residual blocks on
    one, concatenate, fuse with a 1x1. ``blocks`` is an ``nn.Sequential`` so whole blocks can be
    dropped (depth scaling / block pruning) without touching the rest.
    """

    def __init__(
        self, c_in: int, c_out: int, n: int = 1, act: str = "relu", shortcut: bool = True, multiple: int = 8
    ) -> None:
        super().__init__()
        hidden = max(8, c_out // 2)
        hidden += -hidden % multiple  # round up to the channel multiple
        self.cv1 = ConvBNAct(c_in, hidden, 1, 1, act)
        self.cv2 = ConvBNAct(c_in, hidden, 1, 1, act)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden, act, shortcut) for _ in range(n)))
        self.cv3 = ConvBNAct(2 * hidden, c_out, 1, 1, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat([self.blocks(self.cv1(x)), self.cv2(x)], dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max-pools, concatenated."""

    def __init__(self, c_in: int, c_out: int, act: str = "relu") -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = ConvBNAct(c_in, hidden, 1, 1, act)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.cv2 = ConvBNAct(hidden * 4, c_out, 1, 1, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], dim=1))
