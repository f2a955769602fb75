"""The SSD family's loss: prior matching, class loss with hard-negative mining, box loss.

Matching (Liu et al. 2016): a prior is positive for the ground truth it overlaps most when
that IoU is >= ``fg_iou``, and every ground truth's best prior is positive whatever its IoU,
so no object - however small or oddly shaped - goes untrained.

Class loss: ``ce`` is softmax cross-entropy over background + C classes on the positives and
the ``neg_pos_ratio`` x as many hardest negatives per image (the highest background loss);
``focal`` is sigmoid focal loss over the C classes on every prior (no mining: focal loss
down-weights the easy negatives itself). Box loss, on positives only: ``l1`` / ``smooth_l1`` /
``mse`` on the encoded offsets (SSD's own), or an IoU-family loss on the decoded boxes in input
pixels (so IoU-aware terms see true aspect ratios), optionally plus ``l1_weight`` x smooth-L1 on
the offsets. Both are summed and divided by the number of positives in the batch.

Ignore regions (crowd boxes, ``build_engine.ignore_regions``): a prior that is no positive and
whose intersection over its own area with one is >= ``IGNORE_IOF`` is never a negative: ``ce``
does not mine it, ``focal`` gives it no loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from build_engine.ignore_regions import boxes_in_regions
from build_engine.losses import LossConfig, box_loss, focal_loss, pairwise_iou, set_but_unread
from build_engine.model.ssd_coding import cxcywh_to_xyxy, decode, encode
from perception.errors import ConfigError

OFFSET_LOSSES = ("l1", "smooth_l1", "mse")
CLS_LOSSES = ("ce", "focal")


def check_ssd_cls_loss(cfg: LossConfig) -> None:
    """ConfigError unless ``cfg.cls_loss`` is one this loss has (``TrainConfig`` checks at load)."""
    if cfg.cls_loss not in CLS_LOSSES:
        raise ConfigError(f"the ssd family needs loss.cls_loss in {CLS_LOSSES}, got {cfg.cls_loss!r}")


def ssd_ignored_settings(cfg: LossConfig) -> list[str]:
    """The settings ``cfg`` moves off their defaults that ``ssd_loss`` does not read, worded as
    ``set_but_unread`` words them (``TrainConfig`` refuses them at load)."""
    unread = {"obj_weight": "", "obj_focal": "", "center_radius": ""}  # no objectness, no SimOTA
    if cfg.cls_loss == "ce":
        unread.update(focal_gamma="read with loss.cls_loss focal", focal_alpha="read with loss.cls_loss focal")
    else:
        unread["neg_pos_ratio"] = "read with loss.cls_loss ce: focal mines no negatives"
    if cfg.box_loss in OFFSET_LOSSES:
        unread["l1_weight"] = "read with an IoU-family loss.box_loss, as an extra term on the offsets"
    return set_but_unread(cfg, unread)


@torch.no_grad()
def match_priors(
    priors_xyxy: torch.Tensor, gt_boxes: torch.Tensor, fg_iou: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: (matched ground-truth index (N,) int64, positive mask (N,) bool).

    priors_xyxy (N, 4) and gt_boxes (M, 4) are corners in the same units. When two ground
    truths share a best prior, the later one keeps it.
    """
    n, m = priors_xyxy.shape[0], gt_boxes.shape[0]
    if m == 0:
        return torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
    iou = pairwise_iou(gt_boxes, priors_xyxy)  # (M, N)
    best_iou, best_gt = iou.max(0)
    best_prior = iou.argmax(1)
    best_gt[best_prior] = torch.arange(m)
    best_iou[best_prior] = 1.0  # fg_iou < 1 (LossConfig)
    return best_gt, best_iou >= fg_iou


def hardest_negatives(neg_loss: torch.Tensor, num_neg: torch.Tensor) -> torch.Tensor:
    """(B, N) mask of the ``num_neg[b]`` largest ``neg_loss[b]`` per row (positives at -inf)."""
    mask = torch.zeros_like(neg_loss, dtype=torch.bool)
    k = int(num_neg.max()) if num_neg.numel() else 0
    if k > 0:
        idx = neg_loss.topk(k, dim=1).indices
        mask.scatter_(1, idx, torch.arange(k, device=neg_loss.device)[None] < num_neg[:, None])
    return mask


def ssd_loss(
    logits: torch.Tensor,
    offsets: torch.Tensor,
    priors: torch.Tensor,
    targets: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: LossConfig,
    input_wh: tuple[int, int],
    ignore: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts {"cls", "box", "l1", "num_pos" (per image)}.

    logits (B, C + 1, N), offsets (B, N, 4) raw head outputs (``SsdDetector.forward_raw``); priors (N, 4) cx cy w h
    normalised; targets per image (boxes (M, 4) x1 y1 x2 y2 input px, classes (M,) int64);
    input_wh the input (width, height) in px; ignore (optional) per image ignore regions (K, 4)
    x1 y1 x2 y2 input px (crowd boxes): the priors in them that are no positive are no negatives.
    Without regions the loss is what it is without ``ignore``.

    An image without objects still teaches the background: it mines ``neg_pos_ratio`` negatives
    as if it had one positive (the batch's normaliser stays its positive count, at least 1).
    """
    check_ssd_cls_loss(cfg)
    b, k, n = logits.shape
    if ignore is not None and len(ignore) != len(targets):
        raise ValueError(f"{len(targets)} target entries but {len(ignore)} ignore entries")
    w, h = input_wh
    scale = torch.tensor([w, h, w, h], dtype=offsets.dtype, device=offsets.device)
    priors_xyxy = cxcywh_to_xyxy(priors)
    labels = torch.zeros(b, n, dtype=torch.long, device=logits.device)
    matched = torch.zeros(b, n, 4, dtype=offsets.dtype, device=offsets.device)
    in_regions = torch.zeros(b, n, dtype=torch.bool, device=logits.device)
    # A prior is judged by its part in the image (edge priors reach past it; detections are
    # clipped to the image before evaluation ignores them on a crowd region).
    in_image = priors_xyxy.clamp(0, 1) if ignore is not None else priors_xyxy
    for i, (boxes, classes) in enumerate(targets):
        if ignore is not None:
            in_regions[i] = boxes_in_regions(in_image, ignore[i].to(offsets) / scale)
        if boxes.shape[0] == 0:
            continue
        gt = boxes.to(offsets) / scale
        idx, pos_i = match_priors(priors_xyxy, gt, cfg.fg_iou)
        labels[i] = torch.where(pos_i, classes[idx] + 1, 0)
        matched[i] = gt[idx]
    pos = labels > 0
    ignored = in_regions & ~pos
    num_pos = pos.sum(1)
    norm = num_pos.sum().clamp(min=1).to(offsets.dtype)

    if cfg.cls_loss == "ce":
        ce = F.cross_entropy(logits, labels, reduction="none")  # (B, N)
        with torch.no_grad():
            # Positives and ignored priors at -inf, and never more negatives than the rest.
            num_neg = (cfg.neg_pos_ratio * num_pos.clamp(min=1)).long().clamp(max=n - num_pos - ignored.sum(1))
            neg = hardest_negatives(ce.detach().masked_fill(pos | ignored, float("-inf")), num_neg)
        l_cls = ce[pos | neg].sum() / norm
    else:
        onehot = torch.zeros_like(logits).scatter_(1, labels[:, None], 1.0)[:, 1:]
        focal = focal_loss(logits[:, 1:], onehot, cfg.focal_gamma, cfg.focal_alpha)
        if bool(ignored.any()):  # without ignore regions the sum (and its gradient) is untouched
            focal = focal.masked_fill(ignored[:, None], 0.0)
        l_cls = focal.sum() / norm

    pri = priors.expand(b, n, 4)[pos]
    pred, gt = offsets[pos], matched[pos]
    l_l1 = offsets.sum() * 0.0
    if cfg.box_loss in OFFSET_LOSSES:
        l_box = box_loss(pred, encode(gt, pri), cfg.box_loss).sum() / norm
    else:
        l_box = box_loss(decode(pred, pri) * scale, gt * scale, cfg.box_loss).sum() / norm
        if cfg.l1_weight > 0:
            l_l1 = box_loss(pred, encode(gt, pri), "smooth_l1").sum() / norm
    total = cfg.cls_weight * l_cls + cfg.box_weight * l_box + cfg.l1_weight * l_l1
    parts = {"cls": float(l_cls.detach()), "box": float(l_box.detach()), "l1": float(l_l1.detach()),
             "num_pos": float(num_pos.sum()) / b}
    return total, parts
