"""The SSD-style single-shot detector: prior boxes, a background class, softmax scores.

Same CSP backbone and PAN neck as the YOLO-style ``Detector`` (strides 8/16/32), plus one SSD
"extra layer" (stride 64) for the largest objects - a bus or truck next to the camera - and
a decoupled head per level predicting, for each of its A priors, C + 1 class logits (class 0
is the background) and 4 box offsets.

``eval()`` mode: ``forward(x)`` with x (B, 3, H, W) float32 RGB in [0, 1] returns
``(boxes, scores)`` in the manifest's ``ssd`` layout: boxes (B, N, 4) x1 y1 x2 y2 normalised
to 0..1 of the input (decoded in the graph, no data-dependent control flow, so it exports to
ONNX with a dynamic batch) and scores (B, N, C + 1) probabilities.
``train()`` mode: returns the raw ``(class logits (B, C + 1, N), offsets (B, N, 4))``.

Priors (``make_priors``) are sized for road scenes, whose objects are small: in the generated
data at 512x288 the median object is 14 px (sqrt of its area), a quarter are under 10 px, the
largest about 210 px, and widths / heights run from 0.22 (pedestrians, traffic lights) through
1 (signs, cyclists) to 1.45 (cars, seen from behind). A stride-8 grid is too coarse for a
10 px box: a prior off by half a cell overlaps it by IoU < 0.5, so one centre per cell leaves
a third of the objects with only their one forced match (1.8 priors at IoU >= 0.5 on average).
The two smallest stride-8 sizes are therefore densified 2x2 per cell (FaceBoxes, Zhang et al.
2017): with them 89% of the objects have a prior at IoU >= 0.5 (3.2 on average) and 99% one at
>= 0.4, for 67k priors at 512x288 instead of 26k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from build_engine.losses import LossConfig
from build_engine.model.blocks import ConvBNAct
from build_engine.model.config import ModelConfig
from build_engine.model.detector import PAN, Backbone
from build_engine.model.ssd_coding import decode
from build_engine.model.ssd_loss import ssd_loss

# Width / height of the priors: ~2x apart, so every ratio from 0.25 to 2 is within IoU 0.7 of one.
ASPECT_RATIOS = (0.35, 0.7, 1.4)
# Prior probability of an object at init (focal-loss paper, Lin et al. 2017).
PRIOR_PROB = 0.01


@dataclass(frozen=True)
class PriorLevel:
    """The priors of one feature map: per cell, for each size (sqrt of the area, in strides)
    ``density`` x ``density`` evenly spaced centres, and at each centre every aspect ratio."""

    stride: int
    sizes: tuple[float, ...]
    density: tuple[int, ...]

    @property
    def per_cell(self) -> int:
        return sum(d * d for d in self.density) * len(ASPECT_RATIOS)


# Sizes half an octave apart from 8 px (stride 8) to 256 px (stride 64).
PRIOR_LEVELS = (
    PriorLevel(8, (1.0, math.sqrt(2), 2.0), (2, 2, 1)),
    PriorLevel(16, (math.sqrt(2), 2.0), (1, 1)),
    PriorLevel(32, (math.sqrt(2), 2.0), (1, 1)),
    PriorLevel(64, (math.sqrt(2), 2.0, 2 * math.sqrt(2), 4.0), (1, 1, 1, 1)),
)


def make_priors(input_width: int, input_height: int) -> torch.Tensor:
    """(N, 4) priors cx, cy, w, h normalised to 0..1, in the head's output order.

    A level's map is ceil(size / stride) cells per axis (what the stride-2 convs produce), and
    its centres are spread evenly over the image, so the stride-64 map of a 288-row input
    (5 rows) still covers it symmetrically. Order: level, row, column, then per cell size,
    sub-centre (row-major), aspect ratio - the head's channel order.
    """
    out = []
    for level in PRIOR_LEVELS:
        fh, fw = -(-input_height // level.stride), -(-input_width // level.stride)
        cell = []
        for size, d in zip(level.sizes, level.density, strict=True):
            sub = (torch.arange(d, dtype=torch.float32) + 0.5) / d
            px = size * level.stride
            for oy in sub:
                for ox in sub:
                    for r in ASPECT_RATIOS:
                        w, h = px * math.sqrt(r) / input_width, px / math.sqrt(r) / input_height
                        cell.append((float(ox), float(oy), w, h))
        c = torch.tensor(cell)  # (A, 4): offset within the cell (x, y) in cells, w, h normalised
        ys, xs = torch.meshgrid(torch.arange(fh, dtype=torch.float32), torch.arange(fw, dtype=torch.float32),
                                indexing="ij")
        cx = (xs[..., None] + c[:, 0]) / fw
        cy = (ys[..., None] + c[:, 1]) / fh
        wh = c[:, 2:].expand(fh, fw, -1, -1)
        out.append(torch.cat([torch.stack([cx, cy], -1), wh], -1).reshape(-1, 4))
    return torch.cat(out)


class ExtraLayer(nn.Module):
    """SSD extra layer: 1x1 reduce, then a stride-2 3x3 - the stride-64 map."""

    def __init__(self, c_in: int, c_out: int, act: str) -> None:
        super().__init__()
        self.reduce = ConvBNAct(c_in, c_out, 1, 1, act)
        self.down = ConvBNAct(c_out, c_out, 3, 2, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.reduce(x))


class SsdHead(nn.Module):
    """One level's head: a shared 1x1 stem, then decoupled 3x3 class and box branches with 1x1
    predictions. Decoupling is what the YOLO-style head here uses; the 1x1 predictions after
    3x3 branches cost a ninth of SSD's 3x3 prediction convs, whose output is A * (C + 5) wide.
    """

    def __init__(self, c_in: int, c_head: int, num_priors: int, num_classes: int, act: str) -> None:
        super().__init__()
        self.num_priors = num_priors
        self.num_outputs = num_classes + 1
        self.stem = ConvBNAct(c_in, c_head, 1, 1, act)
        self.cls_conv = ConvBNAct(c_head, c_head, 3, 1, act)
        self.reg_conv = ConvBNAct(c_head, c_head, 3, 1, act)
        self.cls_pred = nn.Conv2d(c_head, num_priors * self.num_outputs, 1)
        self.box_pred = nn.Conv2d(c_head, num_priors * 4, 1)
        # Built with bias=True above; nn.Conv2d types its bias as optional.
        assert self.cls_pred.bias is not None and self.box_pred.bias is not None
        # Start at p(object) = PRIOR_PROB under both heads' activations, so the first steps are
        # not swamped by the tens of thousands of background priors per image: every class logit at
        # -log((1 - p) / p) gives sigmoid p (focal), and the background logit at log(C) then
        # gives softmax p(background) = 1 - p (CE).
        bias = self.cls_pred.bias.detach().view(num_priors, self.num_outputs)
        bias.fill_(-math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        bias[:, 0] = math.log(num_classes)
        # Zero offsets: every prior starts as its own box.
        nn.init.zeros_(self.box_pred.weight)
        nn.init.zeros_(self.box_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits (B, C + 1, h*w*A), offsets (B, h*w*A, 4)) in ``make_priors`` order."""
        x = self.stem(x)
        cls = self.cls_pred(self.cls_conv(x))
        box = self.box_pred(self.reg_conv(x))
        b, _, h, w = cls.shape
        logits = cls.view(b, self.num_priors, self.num_outputs, h, w).permute(0, 2, 3, 4, 1)
        offsets = box.view(b, self.num_priors, 4, h, w).permute(0, 3, 4, 1, 2)
        return logits.reshape(b, self.num_outputs, -1), offsets.reshape(b, -1, 4)


class SsdDetector(nn.Module):
    """Backbone + PAN + one extra layer + per-level SSD heads; see the module docstring.

    Keeps the family contract of ``build_engine.model.detector.Detector``. The scores are a
    softmax over background + classes, unless the head was trained with sigmoid focal loss
    (``loss.cls_loss: focal``), which trains per-class sigmoids and no background logit: then
    they are those sigmoids, with background = 1 - the largest. Which one is recorded in the
    persistent buffer ``sigmoid_scores`` (set by ``training_loss``), so a checkpoint or an EMA
    copy serves what it was trained for.
    """

    output_layout = "ssd"
    output_names: tuple[str, ...] = ("boxes", "scores")
    export_batch: int | None = None
    priors: torch.Tensor  # buffers, declared for the type checker
    sigmoid_scores: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.neck = PAN(cfg, self.backbone.out_channels)
        c3, c4, c5 = self.neck.out_channels
        self.extra = ExtraLayer(c5, c4, cfg.act)
        c_head = cfg.head_channels or c3
        self.heads = nn.ModuleList(
            SsdHead(c, c_head, level.per_cell, cfg.num_classes, cfg.act)
            for c, level in zip((c3, c4, c5, c4), PRIOR_LEVELS, strict=True)
        )
        self.register_buffer("priors", make_priors(cfg.input_width, cfg.input_height), persistent=False)
        self.register_buffer("sigmoid_scores", torch.zeros((), dtype=torch.bool))

    def priors_for(self, height: int, width: int) -> torch.Tensor:
        """The priors of an input size; the cached ones for the configured size."""
        p = self.priors
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return p  # export: the graph is built for the configured (static) input size
        if (height, width) == (self.cfg.input_height, self.cfg.input_width):
            return p
        return make_priors(width, height).to(p.device)

    def forward_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits (B, C + 1, N), offsets (B, N, 4)) over all levels.

        The logits are channels-first: softmax and cross-entropy over a last axis of C + 1 = 8
        run 6x slower on CPU than over axis 1 (measured: 98 vs 16 ms per batch of 8).
        """
        p3, p4, p5 = self.neck(self.backbone(x))
        outs = [head(f) for head, f in zip(self.heads, (p3, p4, p5, self.extra(p5)), strict=True)]
        return torch.cat([o[0] for o in outs], 2), torch.cat([o[1] for o in outs], 1)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, N, C + 1) from logits (B, C + 1, N), class 0 the background."""
        if not bool(self.sigmoid_scores):  # a model constant, fixed when the graph is traced
            # Softmax over axis 1 written out: onnxruntime runs its Softmax op on a non-last axis
            # through transposes, 1.6x slower (measured: 1.24 vs 0.77 ms for 67k priors).
            e = (logits - logits.amax(1, keepdim=True)).exp()
            return (e / e.sum(1, keepdim=True)).transpose(1, 2)
        fg = logits[:, 1:].sigmoid()
        return torch.cat([1 - fg.amax(1, keepdim=True), fg], 1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, offsets = self.forward_raw(x)
        if self.training:
            return logits, offsets
        boxes = decode(offsets, self.priors_for(x.shape[2], x.shape[3]))
        return boxes, self.scores(logits)

    def training_loss(
        self, images: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]], loss_cfg: LossConfig,
        ignore: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Matched-prior class + box loss of one batch (``build_engine.model.ssd_loss``); ``ignore``:
        per image (K, 4) xyxy input px ignore regions (crowd boxes)."""

        self.sigmoid_scores.fill_(loss_cfg.cls_loss == "focal")
        logits, offsets = self.forward_raw(images)
        h, w = images.shape[2], images.shape[3]
        return ssd_loss(logits, offsets, self.priors_for(h, w), targets, loss_cfg, (w, h), ignore)
