"""Losses of the two-stage family: RoI sampling and the box head's classification + regression
loss. The region proposal network is a class-agnostic YOLOX head and keeps the one-stage
``DetectionLoss`` (SimOTA), configured by ``rpn_loss_config``.

Box head (Fast R-CNN, Girshick 2015): every sampled RoI is classified over C + 1 classes
(0 = background) by softmax cross-entropy, averaged over the sampled RoIs; a foreground RoI
also regresses its ground truth with the deltas of the ground truth's class: smooth-L1 / L1 /
MSE on ``BoxCoder`` deltas, or 1 - IoU-family on the decoded box, averaged over the
foreground RoIs.

Ignore regions (crowd boxes, ``build_engine.ignore_regions``): the proposal network's loss leaves
them out as the one-stage loss does, and a candidate RoI that is no foreground and whose
intersection over its own area with one is >= ``IGNORE_IOF`` is never sampled as background.
"""

from __future__ import annotations

import dataclasses

import torch

from build_engine.ignore_regions import boxes_in_regions
from build_engine.losses import LossConfig, box_loss, ce_loss, pairwise_iou, set_but_unread
from build_engine.model.rcnn_ops import BoxCoder

IOU_LOSSES = ("iou", "giou", "diou", "ciou")


def rpn_loss_config(loss_cfg: LossConfig) -> LossConfig:
    """The proposal head's loss: the one-stage YOLOX loss with the run's weights, BCE
    objectness / quality, and the run's box loss if it is IoU-family (SimOTA's cost needs IoU),
    else CIoU."""
    kind = loss_cfg.box_loss if loss_cfg.box_loss in IOU_LOSSES else "ciou"
    return dataclasses.replace(loss_cfg, cls_loss="bce", box_loss=kind, l1_weight=0.0)


# loss.cls_loss values this family accepts though it reads none (its proposals train with BCE,
# its box head with softmax CE): bce is the default, ce what configs/rcnn.yaml records; focal
# would change nothing, and is refused.
RCNN_CLS_LOSSES = ("bce", "ce")


def rcnn_ignored_settings(cfg: LossConfig) -> list[str]:
    """The settings ``cfg`` moves off their defaults that this family's loss does not read, worded
    as ``set_but_unread`` words them (``TrainConfig`` refuses them at load)."""
    unread = {"l1_weight": "", "neg_pos_ratio": ""}  # rpn_loss_config turns l1 off; nothing mines
    if not cfg.obj_focal:
        when = "read with loss.obj_focal true, by the proposal objectness"
        unread.update(focal_gamma=when, focal_alpha=when)
    out = set_but_unread(cfg, unread)
    if cfg.cls_loss not in RCNN_CLS_LOSSES:
        out.insert(0, f"loss.cls_loss={cfg.cls_loss} (the proposals train with bce, the box head with ce)")
    return out


@torch.no_grad()
def sample_rois(
    proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_cls: torch.Tensor, num_rois: int, fg_fraction: float,
    fg_iou: float, ignore: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoIs of one image for the box head: (rois (R, 4), labels (R,) int64, matched gt boxes (R, 4)).

    Candidates are the proposals plus the ground truths themselves (so the head sees
    foreground from the first step). A candidate whose best IoU with a ground truth is
    >= ``fg_iou`` is foreground with label gt class + 1, else background 0 (its matched box is
    then meaningless). A background candidate in an ``ignore`` region ((K, 4) xyxy, crowd boxes;
    IoF >= ``IGNORE_IOF``) is no candidate. At most ``fg_fraction * num_rois`` foreground and
    ``num_rois`` in all are drawn at random (the global torch RNG: seeded runs repeat; without
    ignore regions the draws are those without ``ignore``).
    """
    cand = torch.cat([proposals, gt_boxes.to(proposals.dtype)])
    labels = torch.zeros(cand.shape[0], dtype=torch.long)
    matched = torch.zeros_like(cand)
    if gt_boxes.shape[0]:
        best_iou, best = pairwise_iou(cand, gt_boxes).max(1)
        fg = best_iou >= fg_iou
        labels[fg] = gt_cls[best[fg]].long() + 1
        matched = gt_boxes[best].to(cand.dtype)
    fg_idx = (labels > 0).nonzero(as_tuple=True)[0]
    bg = labels == 0
    if ignore is not None:
        bg &= ~boxes_in_regions(cand, ignore)
    bg_idx = bg.nonzero(as_tuple=True)[0]
    n_fg = min(fg_idx.numel(), int(num_rois * fg_fraction))
    n_bg = min(bg_idx.numel(), num_rois - n_fg)
    keep = torch.cat([fg_idx[torch.randperm(fg_idx.numel())[:n_fg]], bg_idx[torch.randperm(bg_idx.numel())[:n_bg]]])
    return cand[keep], labels[keep], matched[keep]


def box_head_loss(
    cls_logits: torch.Tensor, deltas: torch.Tensor, rois: torch.Tensor, labels: torch.Tensor,
    gt_boxes: torch.Tensor, kind: str, coder: BoxCoder,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(classification loss, box loss, number of foreground RoIs) of the sampled RoIs.

    cls_logits (R, C + 1); deltas (R, C, 4) per-class deltas; rois (R, 4); labels (R,) in
    0..C (0 = background); gt_boxes (R, 4) matched boxes (read for foreground only); kind a
    ``build_engine.losses.BOX_LOSSES`` name. The classification loss is the mean CE over all R,
    the box loss the mean over the foreground (0 without foreground).
    """
    l_cls = ce_loss(cls_logits, labels).sum() / max(1, labels.numel())
    fg = (labels > 0).nonzero(as_tuple=True)[0]
    if fg.numel() == 0:
        return l_cls, deltas.sum() * 0.0, 0
    d = deltas[fg, labels[fg] - 1]  # (F, 4): each foreground's deltas for its own class
    if kind in IOU_LOSSES:
        l_box = box_loss(coder.decode(d, rois[fg]), gt_boxes[fg], kind)
    else:
        l_box = box_loss(d, coder.encode(gt_boxes[fg], rois[fg]), kind)
    return l_cls, l_box.sum() / fg.numel(), int(fg.numel())
