"""The anchor-free YOLO-style detector: CSP backbone, PAN neck, decoupled head (strides 8/16/32).

``eval()`` mode: ``forward(x)`` with x (B, 3, H, W) float32 RGB in [0, 1] returns (B, N, 5 + C)
in the manifest's ``yolo_obj`` layout: x1 y1 x2 y2 in input pixels, sigmoid objectness,
sigmoid class probabilities; N = sum over levels of (H / s) * (W / s). The decode (grid +
stride) is in the graph and has no data-dependent control flow, so it exports to ONNX
opset 17 with a dynamic batch.

``train()`` mode: returns the raw per-level maps, a list of (B, 5 + C, H / s, W / s) tensors
(channels: 4 box, 1 objectness logit, C class logits), for the loss.

Box parametrisation per cell (YOLOX-style): centre = (cell + offset) * stride,
size = exp(p) * stride with p clamped so an untrained head cannot overflow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from build_engine.losses import DetectionLoss, LossConfig
from build_engine.model.blocks import SPPF, ConvBNAct, CSPStage
from build_engine.model.config import BASE_CHANNELS, BASE_DEPTHS, BASE_NECK_DEPTH, STRIDES, ModelConfig
from perception.errors import ConfigError

# exp(6) * 32 = 12.9k px: far beyond any input, yet finite in fp16.
MAX_LOG_WH = 6.0
# Prior probability of objectness / class at init (focal-loss paper, Lin et al. 2017).
PRIOR_PROB = 0.01


class Backbone(nn.Module):
    """Stem (stride 2) and four CSP stages; returns the stride 8, 16, 32 features."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = [cfg.channels(b) for b in BASE_CHANNELS]
        d = [cfg.depth(b) for b in BASE_DEPTHS]
        a, m = cfg.act, cfg.channel_multiple
        self.stem = ConvBNAct(3, c[0], 3, 2, a)
        self.stage1 = nn.Sequential(ConvBNAct(c[0], c[1], 3, 2, a), CSPStage(c[1], c[1], d[0], a, multiple=m))
        self.stage2 = nn.Sequential(ConvBNAct(c[1], c[2], 3, 2, a), CSPStage(c[2], c[2], d[1], a, multiple=m))
        self.stage3 = nn.Sequential(ConvBNAct(c[2], c[3], 3, 2, a), CSPStage(c[3], c[3], d[2], a, multiple=m))
        self.stage4 = nn.Sequential(
            ConvBNAct(c[3], c[4], 3, 2, a), CSPStage(c[4], c[4], d[3], a, multiple=m), SPPF(c[4], c[4], a)
        )
        self.out_channels = (c[2], c[3], c[4])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stage1(self.stem(x))
        p3 = self.stage2(x)
        p4 = self.stage3(p3)
        p5 = self.stage4(p4)
        return p3, p4, p5


class PAN(nn.Module):
    """Top-down then bottom-up path aggregation over (P3, P4, P5)."""

    def __init__(self, cfg: ModelConfig, in_channels: tuple[int, int, int]) -> None:
        super().__init__()
        c3, c4, c5 = in_channels
        n = cfg.depth(BASE_NECK_DEPTH)
        a, m = cfg.act, cfg.channel_multiple
        self.reduce5 = ConvBNAct(c5, c4, 1, 1, a)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = CSPStage(c4 * 2, c4, n, a, shortcut=False, multiple=m)
        self.reduce4 = ConvBNAct(c4, c3, 1, 1, a)
        self.td3 = CSPStage(c3 * 2, c3, n, a, shortcut=False, multiple=m)
        self.down3 = ConvBNAct(c3, c3, 3, 2, a)
        self.bu4 = CSPStage(c3 * 2, c4, n, a, shortcut=False, multiple=m)
        self.down4 = ConvBNAct(c4, c4, 3, 2, a)
        self.bu5 = CSPStage(c4 * 2, c5, n, a, shortcut=False, multiple=m)
        self.out_channels = (c3, c4, c5)

    def forward(self, feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        p3, p4, p5 = feats
        r5 = self.reduce5(p5)
        t4 = self.td4(torch.cat([self.up(r5), p4], 1))
        r4 = self.reduce4(t4)
        n3 = self.td3(torch.cat([self.up(r4), p3], 1))
        n4 = self.bu4(torch.cat([self.down3(n3), r4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), r5], 1))
        return [n3, n4, n5]


class HeadLevel(nn.Module):
    """Decoupled head of one level: a shared 1x1 stem, a class branch, a box+objectness branch."""

    def __init__(self, c_in: int, c_head: int, num_classes: int, act: str) -> None:
        super().__init__()
        self.stem = ConvBNAct(c_in, c_head, 1, 1, act)
        self.cls_conv = ConvBNAct(c_head, c_head, 3, 1, act)
        self.reg_conv = ConvBNAct(c_head, c_head, 3, 1, act)
        self.cls_pred = nn.Conv2d(c_head, num_classes, 1)
        self.box_pred = nn.Conv2d(c_head, 4, 1)
        self.obj_pred = nn.Conv2d(c_head, 1, 1)
        prior = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        # Built with bias=True above; nn.Conv2d types its bias as optional.
        assert self.cls_pred.bias is not None and self.obj_pred.bias is not None and self.box_pred.bias is not None
        nn.init.constant_(self.cls_pred.bias, prior)
        nn.init.constant_(self.obj_pred.bias, prior)
        nn.init.zeros_(self.box_pred.weight)
        nn.init.zeros_(self.box_pred.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        reg = self.reg_conv(x)
        return torch.cat([self.box_pred(reg), self.obj_pred(reg), self.cls_pred(self.cls_conv(x))], 1)


def make_grid(h: int, w: int, stride: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1, h*w, 2) cell indices x, y (not multiplied by stride), row-major like a flattened map."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys], -1).reshape(1, h * w, 2)


def decode_level(raw: torch.Tensor, grid: torch.Tensor, stride: int) -> torch.Tensor:
    """Raw map (B, 5 + C, h, w) -> (B, h*w, 5 + C): boxes xyxy in input pixels, obj/cls still logits."""
    b, c, h, w = raw.shape
    p = raw.flatten(2).permute(0, 2, 1)
    xy = (grid + p[..., 0:2] + 0.5) * stride
    wh = torch.exp(p[..., 2:4].clamp(max=MAX_LOG_WH)) * stride
    return torch.cat([xy - wh / 2, xy + wh / 2, p[..., 4:]], -1)


class Detector(nn.Module):
    """Backbone + PAN + decoupled heads; see the module docstring for the two output modes.

    The family contract every detector module keeps (``build_engine.model.build_detector``):
    ``cfg``, ``output_layout`` (the manifest layout its eval-mode outputs are in),
    ``output_names`` (ONNX output names, in forward's order), ``export_batch`` (None: dynamic
    batch) and ``training_loss(images, targets, loss_cfg, ignore=None)`` -> (loss, {part: float}),
    ``ignore`` per image (K, 4) xyxy input px ignore regions (crowd boxes,
    ``build_engine.ignore_regions``) whose unassigned predictions are no negatives.
    """

    output_layout = "yolo_obj"
    output_names: tuple[str, ...] = ("output",)
    export_batch: int | None = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.strides = STRIDES
        self.backbone = Backbone(cfg)
        self.neck = PAN(cfg, self.backbone.out_channels)
        c_head = cfg.head_channels or self.neck.out_channels[0]
        self.heads = nn.ModuleList(HeadLevel(c, c_head, cfg.num_classes, cfg.act) for c in self.neck.out_channels)
        for i, s in enumerate(self.strides):
            g = make_grid(cfg.input_height // s, cfg.input_width // s, s)
            self.register_buffer(f"grid{i}", g, persistent=False)
        self._criterion: DetectionLoss | None = None

    def resize_input(self, width: int, height: int) -> None:
        """Serve these weights at another input size: the config and the cached cell grids
        (which an export bakes in) follow it. Fully convolutional, nothing else changes."""
        self.cfg = dataclasses.replace(self.cfg, input_width=width, input_height=height)
        for i, s in enumerate(self.strides):
            g = getattr(self, f"grid{i}")
            setattr(self, f"grid{i}", make_grid(height // s, width // s, s).to(g.device))

    def grid(self, level: int, h: int, w: int) -> torch.Tensor:
        """Cell grid of a level; the cached one when the map has the configured size."""
        g: torch.Tensor = getattr(self, f"grid{level}")
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return g  # export: the graph is built for the configured (static) input size
        if g.shape[1] == h * w and h == self.cfg.input_height // self.strides[level]:
            return g
        return make_grid(h, w, self.strides[level]).to(g.device)

    def forward_raw(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-level raw maps, each (B, 5 + C, H / s, W / s)."""
        feats = self.neck(self.backbone(x))
        return [head(f) for head, f in zip(self.heads, feats, strict=True)]

    def decode(self, raws: list[torch.Tensor]) -> torch.Tensor:
        """(B, N, 5 + C) with xyxy boxes in input pixels and obj/cls logits (not yet sigmoid)."""
        out = []
        for i, (raw, s) in enumerate(zip(raws, self.strides, strict=True)):
            out.append(decode_level(raw, self.grid(i, raw.shape[2], raw.shape[3]), s))
        return torch.cat(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        raws = self.forward_raw(x)
        if self.training:
            return raws
        d = self.decode(raws)
        return torch.cat([d[..., :4], d[..., 4:].sigmoid()], -1)


    def training_loss(
        self, images: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]], loss_cfg: LossConfig,
        ignore: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """SimOTA-assigned IoU + objectness + class loss of one batch (train mode); ``ignore``: per
        image (K, 4) xyxy input px ignore regions (crowd boxes, ``DetectionLoss``)."""
        if self._criterion is None or self._criterion.cfg != loss_cfg:
            self._criterion = DetectionLoss(loss_cfg, self.cfg.num_classes)
        centers, strides = self.anchor_points()
        decoded = self.decode(self(images))  # train mode: the raw per-level maps
        return self._criterion(decoded, centers, strides, targets, ignore=ignore)

    def anchor_points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2) cell centres in input px and (N,) strides, in the output order (the loss's
        assignment candidates)."""
        centers, strides = [], []
        for i, s in enumerate(self.strides):
            g = getattr(self, f"grid{i}")[0]
            centers.append((g + 0.5) * s)
            strides.append(torch.full((g.shape[0],), float(s)))
        return torch.cat(centers), torch.cat(strides)


def build_detector(cfg: ModelConfig | None = None) -> Detector:
    """A freshly initialised YOLO-style detector for ``cfg`` (default: the nano preset)."""
    cfg = cfg or ModelConfig()
    if cfg.family != "yolo":
        raise ConfigError(f"build_detector builds the yolo family; use build_model for {cfg.family!r}")
    return Detector(cfg)
