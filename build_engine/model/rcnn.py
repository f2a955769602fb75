"""The two-stage detector (R-CNN family): proposals, RoIAlign, a box head; NMS inside the graph.

Stages:

1. Backbone + PAN neck of the one-stage family (strides 8, 16, 32).
2. Region proposal network: per level a class-agnostic YOLOX head (``HeadLevel`` with one
   class: box, objectness, IoU-quality logits per location), trained with the one-stage
   SimOTA loss (``DetectionLoss`` with one class), as CenterNet2 (Zhou et al. 2021) uses a
   one-stage detector as its first stage. Chosen over a classic anchor RPN for the CPU budget:
   that head and loss are what the default model reaches mAP50-95 0.63 with in 22 epochs, so
   its proposals are useful within the first epochs, with no anchor shapes to tune and no
   second assignment scheme to balance. Proposal score = objectness x quality.
3. Proposals per image: the top ``pre_nms`` scores, class-agnostic NMS at ``rpn_iou``, the
   top ``post_nms`` kept (train 600 -> 256 proposals, test 1000 -> 100).
4. RoIAlign 7x7 (2x2 bilinear samples per bin) from the stride-8 PAN map. The PAN's top-down
   path already carries the stride-16/32 context into it, and one level keeps the graph free
   of per-RoI level routing; most objects here are small, where stride 8 is the level FPN
   would pick anyway.
5. Box head: two fully connected layers, written as a 7x7 and a 1x1 convolution (the same
   arithmetic; the trainer's optimizer collects Conv2d and BatchNorm parameters only), then
   C + 1 class logits (0 = background) and per-class deltas (``BoxCoder``, weights 10, 10, 5, 5).
6. Detections: score = sqrt(softmax probability x proposal score) (a two-stage probability as
   in CenterNet2; the square root keeps it on the scale of a probability so serving thresholds
   such as 0.25 stay meaningful), per-class NMS at ``det_iou`` (boxes offset by class so one
   class-agnostic NMS does it), score > ``score_floor``, the best ``max_det``.

``forward(x)`` (any mode; x (B, 3, H, W) float32 RGB in [0, 1]) returns the ``nms_detections``
layout: ``num_dets (B, 1)`` int64, ``det_boxes (B, K, 4)`` x1 y1 x2 y2 input px,
``det_scores (B, K)``, ``det_classes (B, K)`` int64 in 0..C-1; K is the batch's largest count,
rows past an image's ``num_dets`` are zero. The selection is per image, so the ONNX export is
batch 1 (``export_batch``). ``training_loss`` trains both stages end to end: the RPN loss plus
the box head's loss on RoIs sampled from the (detached) proposals and the ground truths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from build_engine.losses import DetectionLoss, LossConfig
from build_engine.model.blocks import make_act
from build_engine.model.config import BASE_CHANNELS, STRIDES, ModelConfig
from build_engine.model.detector import PAN, Backbone, HeadLevel, decode_level, make_grid
from build_engine.model.rcnn_loss import box_head_loss, rpn_loss_config, sample_rois
from build_engine.model.rcnn_ops import BoxCoder, clip_boxes, nms, roi_align, topk_indices
from perception.errors import ModelError


class BoxHead(nn.Module):
    """Two FC layers over the pooled RoI features, then class logits and per-class deltas."""

    def __init__(self, c_in: int, pool: int, hidden: int, num_classes: int, act: str) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc1 = nn.Conv2d(c_in, hidden, pool)  # fully connected over the pool x pool map
        self.act1 = make_act(act)
        self.fc2 = nn.Conv2d(hidden, hidden, 1)
        self.act2 = make_act(act)
        self.cls_score = nn.Conv2d(hidden, num_classes + 1, 1)
        self.bbox_pred = nn.Conv2d(hidden, 4 * num_classes, 1)
        # Detectron2's init: small output layers so the untrained head predicts uniform classes
        # and near-zero deltas (the proposal itself).
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for conv in (self.cls_score, self.bbox_pred):
            assert conv.bias is not None  # built with bias=True; nn.Conv2d types its bias as optional
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, c_in, pool, pool) -> class logits (R, C + 1), deltas (R, C, 4)."""
        h = self.act2(self.fc2(self.act1(self.fc1(x))))
        return self.cls_score(h).flatten(1), self.bbox_pred(h).reshape(-1, self.num_classes, 4)


class RcnnDetector(nn.Module):
    """Two-stage detector; the module docstring describes the stages and the outputs.

    The selection knobs are attributes (not ``ModelConfig`` fields: they change no weights),
    set after construction to trade recall for speed or, in tests, to make an untrained model
    output detections.
    """

    output_layout = "nms_detections"
    output_names: tuple[str, ...] = ("num_dets", "det_boxes", "det_scores", "det_classes")
    export_batch: int | None = 1

    roi_stride = STRIDES[0]  # RoIAlign reads the stride-8 map
    roi_size = 7
    sampling_ratio = 2

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.strides = STRIDES
        self.backbone = Backbone(cfg)
        self.neck = PAN(cfg, self.backbone.out_channels)
        c_head = cfg.head_channels or self.neck.out_channels[0]
        self.rpn = nn.ModuleList(HeadLevel(c, c_head, 1, cfg.act) for c in self.neck.out_channels)
        # The head's width follows the backbone's widest stage: 256 at the edge preset.
        self.box_head = BoxHead(self.neck.out_channels[0], self.roi_size, cfg.channels(BASE_CHANNELS[-1]),
                                cfg.num_classes, cfg.act)
        for i, s in enumerate(self.strides):
            self.register_buffer(f"grid{i}", make_grid(cfg.input_height // s, cfg.input_width // s, s),
                                 persistent=False)
        self.coder = BoxCoder()
        # Proposals (Faster R-CNN's numbers scaled to ~3000 locations and <= 20 objects per image;
        # the training NMS's IoU matrix is most of a step's non-network time, hence 600).
        self.pre_nms_train, self.post_nms_train = 600, 256
        self.pre_nms_test, self.post_nms_test = 1000, 100
        self.rpn_iou = 0.7
        self.proposal_min_score = 1e-4  # test only: proposals this unlikely cannot score >= 0.01
        # RoI sampling for the box head: up to 32 foreground per image, as Faster R-CNN's
        # 128 x 0.25, with a third of its background (the proposal score, a factor of the final
        # score, already rejects most background) at half the RoIAlign + head cost.
        self.rois_per_image = 64
        self.fg_fraction = 0.5
        # Detections.
        self.det_iou = 0.5
        self.score_floor = 0.01
        self.max_det = 100
        self._rpn_criterion: DetectionLoss | None = None

    def second_stage_macs(self, num_rois: int) -> int:
        """Multiply-adds of RoIAlign (its two matrix products, ``rcnn_ops.roi_align``) and the
        box head for ``num_rois`` proposals: what a per-layer profile of one forward cannot
        know, since the number of proposals depends on the image."""
        h = self.box_head
        p, c = self.roi_size, h.fc1.in_channels
        hf, wf = self.cfg.input_height // self.strides[0], self.cfg.input_width // self.strides[0]
        align = p * c * wf * (hf + p)
        head = sum(m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                   for m in (h.fc1, h.fc2, h.cls_score, h.bbox_pred))
        return num_rois * (align + head)

    def grid(self, level: int, h: int, w: int) -> torch.Tensor:
        """Cell grid of a level; the cached one when the map has the configured size."""
        g: torch.Tensor = getattr(self, f"grid{level}")
        if torch.jit.is_tracing() or g.shape[1] == h * w and h == self.cfg.input_height // self.strides[level]:
            return g
        return make_grid(h, w, self.strides[level]).to(g.device)

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(neck maps, RPN output (B, N, 6): xyxy input px, objectness and quality logits)."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % 32 or x.shape[3] % 32:
            raise ModelError(f"expected images (B, 3, H, W) with H, W multiples of 32, got {tuple(x.shape)}")
        feats = self.neck(self.backbone(x))
        out = []
        for i, (head, f, s) in enumerate(zip(self.rpn, feats, self.strides, strict=True)):
            raw = head(f)
            out.append(decode_level(raw, self.grid(i, raw.shape[2], raw.shape[3]), s))
        return feats, torch.cat(out, 1)

    def propose(
        self, rpn: torch.Tensor, width: int, height: int, pre_nms: int, post_nms: int, min_score: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's proposals from its RPN output (N, 6): boxes (P, 4) clipped to the
        image and their scores (P,), best first."""
        boxes = clip_boxes(rpn[:, :4], width, height)
        scores = torch.sigmoid(rpn[:, 4]) * torch.sigmoid(rpn[:, 5])
        top = topk_indices(scores, min(pre_nms, scores.shape[0]))
        keep = top[nms(boxes[top], scores[top], self.rpn_iou, min_score, post_nms)]
        return boxes[keep], scores[keep]

    def detect(
        self, probs: torch.Tensor, boxes: torch.Tensor, proposal_scores: torch.Tensor, width: int, height: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image's detections from its RoIs' class probabilities (R, C), per-class boxes
        (R, C, 4) and proposal scores (R,): boxes (K, 4), scores (K,), classes (K,) int64."""
        scores = (probs * proposal_scores[:, None]).sqrt().reshape(-1)
        classes = (torch.zeros_like(probs, dtype=torch.long) + torch.arange(probs.shape[1])).reshape(-1)
        flat = boxes.reshape(-1, 4)
        # Shift each class to its own region of the plane: one agnostic NMS is then per class.
        shifted = flat + (classes.to(flat.dtype) * float(max(width, height) + 1))[:, None]
        keep = nms(shifted, scores, self.det_iou, self.score_floor, self.max_det)
        return flat[keep], scores[keep], classes[keep]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detections in the ``nms_detections`` layout (module docstring)."""
        h, w = x.shape[2], x.shape[3]
        feats, rpn = self.features(x)
        rois, pscores, pooled = [], [], []
        for i in range(x.shape[0]):
            b, s = self.propose(rpn[i], w, h, self.pre_nms_test, self.post_nms_test, self.proposal_min_score)
            rois.append(b)
            pscores.append(s)
            pooled.append(roi_align(feats[0][i:i + 1], b, self.roi_stride, self.roi_size, self.sampling_ratio))
        logits, deltas = self.box_head(torch.cat(pooled))
        probs = F.softmax(logits, -1)[:, 1:]
        boxes = clip_boxes(self.coder.decode(deltas, torch.cat(rois)[:, None, :]), w, h)
        if x.shape[0] == 1:  # the exported case: no split, no padding
            db, ds, dc = self.detect(probs, boxes, pscores[0], w, h)
            return (dc >= 0).sum().reshape(1, 1), db[None], ds[None], dc[None]
        counts = [r.shape[0] for r in rois]
        dets = [self.detect(p, b, s, w, h) for p, b, s in
                zip(probs.split(counts), boxes.split(counts), pscores, strict=True)]
        k = max(d[1].shape[0] for d in dets)
        num = torch.tensor([[d[1].shape[0]] for d in dets], dtype=torch.long)
        return (num, torch.stack([F.pad(d[0], (0, 0, 0, k - d[0].shape[0])) for d in dets]),
                torch.stack([F.pad(d[1], (0, k - d[1].shape[0])) for d in dets]),
                torch.stack([F.pad(d[2], (0, k - d[2].shape[0])) for d in dets]))

    def training_loss(
        self, images: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]], loss_cfg: LossConfig,
        ignore: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """RPN loss + box head loss of one batch (train mode).

        Total = RPN SimOTA loss (its own box / objectness / quality terms, weighted as in the
        one-stage family) + cls_weight x box-head CE + box_weight x box-head regression.
        ``ignore``: per image (K, 4) xyxy input px ignore regions (crowd boxes): no objectness
        loss for the proposal cells in them, no background RoIs sampled from them
        (``build_engine.model.rcnn_loss``).
        """
        if len(targets) != images.shape[0]:
            raise ModelError(f"{images.shape[0]} images but {len(targets)} target entries")
        if ignore is not None and len(ignore) != len(targets):
            raise ModelError(f"{len(targets)} target entries but {len(ignore)} ignore entries")
        rpn_cfg = rpn_loss_config(loss_cfg)
        if self._rpn_criterion is None or self._rpn_criterion.cfg != rpn_cfg:
            self._rpn_criterion = DetectionLoss(rpn_cfg, 1)
        h, w = images.shape[2], images.shape[3]
        feats, rpn = self.features(images)
        centers, strides = [], []
        for i, s in enumerate(self.strides):
            g = self.grid(i, h // s, w // s)[0]
            centers.append((g + 0.5) * s)
            strides.append(torch.full((g.shape[0],), float(s)))
        agnostic = [(b, torch.zeros_like(c)) for b, c in targets]
        l_rpn, rpn_parts = self._rpn_criterion(rpn, torch.cat(centers), torch.cat(strides), agnostic, ignore=ignore)
        rois, labels, matched, pooled = [], [], [], []
        for i, (gb, gc) in enumerate(targets):
            with torch.no_grad():
                props, _ = self.propose(rpn[i].detach(), w, h, self.pre_nms_train, self.post_nms_train, 0.0)
            r, lab, m = sample_rois(props, gb, gc, self.rois_per_image, self.fg_fraction, loss_cfg.fg_iou,
                                    None if ignore is None else ignore[i])
            rois.append(r)
            labels.append(lab)
            matched.append(m)
            pooled.append(roi_align(feats[0][i:i + 1], r, self.roi_stride, self.roi_size, self.sampling_ratio))
        logits, deltas = self.box_head(torch.cat(pooled))
        l_cls, l_box, n_fg = box_head_loss(logits, deltas, torch.cat(rois), torch.cat(labels), torch.cat(matched),
                                           loss_cfg.box_loss, self.coder)
        total = l_rpn + loss_cfg.cls_weight * l_cls + loss_cfg.box_weight * l_box
        parts = {"rpn": float(l_rpn.detach()), "rpn_box": rpn_parts["box"], "rpn_obj": rpn_parts["obj"],
                 "cls": float(l_cls.detach()), "box": float(l_box.detach()), "num_fg": n_fg / len(targets)}
        return total, parts
