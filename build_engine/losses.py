"""Detection losses: classification (BCE, focal, quality focal, CE), box regression (IoU, GIoU,
DIoU, CIoU, L1, MSE), objectness, and ``DetectionLoss`` combining them with cls / box / obj weights.

Boxes are (..., 4) xyxy tensors in pixels. Element-wise losses return per-element values; the
caller reduces. ``DetectionLoss`` assigns targets with a simplified SimOTA (YOLOX, Ge et al.
2021): candidate cells are those whose centre lies in a ground-truth box or within 2.5 strides
of its centre; each ground truth takes its ``k`` lowest-cost candidates, k from the sum of its
top-10 IoUs; cost = class BCE + 3 * -log(IoU). A cell whose centre lies in an ignore region (a
crowd box, ``build_engine.ignore_regions``) and that SimOTA assigned to no object gets no
objectness loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from build_engine.ignore_regions import points_in_regions
from perception.errors import ConfigError

CLS_LOSSES = ("bce", "focal", "ce")
BOX_LOSSES = ("iou", "giou", "diou", "ciou", "l1", "mse", "smooth_l1")
EPS = 1e-7


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Element-wise binary cross-entropy on logits: -(t log s(x) + (1 - t) log(1 - s(x)))."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


# The focal factors' base is clamped to this before the power: a saturated logit (or a score
# exactly at its soft target) makes the base 0 in float32, where x^gamma has an infinite slope
# for 0 < gamma < 1; times the base's zero slope that is a NaN gradient, which clip_grad_norm_
# spreads to every parameter. Below it the factor is at most 1e-6 (gamma 0.5), no loss to speak of.
MODULATING_BASE_MIN = 1e-12


def _modulating(base: torch.Tensor, gamma: float) -> torch.Tensor:
    """``base ** gamma`` with a finite gradient everywhere (see ``MODULATING_BASE_MIN``)."""
    return base.clamp(min=MODULATING_BASE_MIN) ** gamma


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """Element-wise focal loss (Lin et al. 2017): alpha_t (1 - p_t)^gamma BCE; alpha < 0 disables alpha."""
    p = torch.sigmoid(logits)
    ce = bce_loss(logits, targets)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * _modulating(1 - p_t, gamma)
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def quality_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Element-wise Quality Focal Loss (GFL, Li et al. 2020): |t - p|^gamma BCE, for soft targets.

    Focal loss's (1 - p_t)^gamma is not minimised at p = t for 0 < t < 1 (gamma 2: target 0.3
    trains p towards 0.12, 0.9 towards 0.99), so it would teach scores other than the targets;
    |t - p|^gamma keeps the minimum at p = t, as BCE's. For t in {0, 1}, |t - p| = 1 - p_t: this
    is ``focal_loss`` without alpha; it has no alpha, as in GFL."""
    return bce_loss(logits, targets) * _modulating((targets - torch.sigmoid(logits)).abs(), gamma)


def ce_loss(logits: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy per row: logits (N, C), target_index (N,) int64 -> (N,)."""
    return F.cross_entropy(logits, target_index, reduction="none")


def _iou_terms(
    pred: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """IoU and the enclosing box's (x1, y1, x2, y2) for pairs of boxes (..., 4)."""
    lt = torch.maximum(pred[..., :2], target[..., :2])
    rb = torch.minimum(pred[..., 2:], target[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_p = (pred[..., 2:] - pred[..., :2]).clamp(min=0).prod(-1)
    area_t = (target[..., 2:] - target[..., :2]).clamp(min=0).prod(-1)
    union = area_p + area_t - inter
    iou = inter / (union + EPS)
    c_lt = torch.minimum(pred[..., :2], target[..., :2])
    c_rb = torch.maximum(pred[..., 2:], target[..., 2:])
    return iou, union, c_lt, c_rb


def box_iou_pairs(pred: torch.Tensor, target: torch.Tensor, kind: str = "iou") -> torch.Tensor:
    """IoU / GIoU / DIoU / CIoU between matching pairs of xyxy boxes (..., 4) -> (...)."""
    iou, union, c_lt, c_rb = _iou_terms(pred, target)
    if kind == "iou":
        return iou
    if kind == "giou":
        c_area = (c_rb - c_lt).prod(-1)
        return iou - (c_area - union) / (c_area + EPS)
    c2 = ((c_rb - c_lt) ** 2).sum(-1) + EPS  # squared diagonal of the enclosing box
    ctr_p = (pred[..., :2] + pred[..., 2:]) / 2
    ctr_t = (target[..., :2] + target[..., 2:]) / 2
    rho2 = ((ctr_p - ctr_t) ** 2).sum(-1)
    if kind == "diou":
        return iou - rho2 / c2
    if kind == "ciou":
        wp, hp = pred[..., 2] - pred[..., 0], pred[..., 3] - pred[..., 1]
        wt, ht = target[..., 2] - target[..., 0], target[..., 3] - target[..., 1]
        v = (4 / math.pi**2) * (torch.atan(wt / (ht + EPS)) - torch.atan(wp / (hp + EPS))) ** 2
        with torch.no_grad():
            alpha = v / (v - iou + 1 + EPS)
        return iou - rho2 / c2 - alpha * v
    raise ValueError(f"unknown IoU kind {kind!r}")


def box_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "ciou", norm: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-box regression loss (...,): 1 - IoU-family metric, or L1 / MSE / smooth-L1 summed over the 4
    coordinates (divided by ``norm``, e.g. the stride, so they are scale-free)."""
    if kind in ("iou", "giou", "diou", "ciou"):
        return 1.0 - box_iou_pairs(pred, target, kind)
    d = pred - target
    if norm is not None:
        d = d / norm.unsqueeze(-1)
    if kind == "l1":
        return d.abs().sum(-1)
    if kind == "mse":
        return (d**2).sum(-1)
    if kind == "smooth_l1":  # Huber with beta 1 (Fast R-CNN / SSD): quadratic below 1, linear above
        a = d.abs()
        return torch.where(a < 1.0, 0.5 * a * a, a - 0.5).sum(-1)
    raise ValueError(f"unknown box loss {kind!r}")


@dataclass(frozen=True)
class LossConfig:
    """Loss choices and weights (the ``loss:`` section of a train config)."""

    # bce / focal: per-class sigmoids (the YOLO family needs one, DetectionLoss refuses ce);
    # ce: softmax over classes + background (the SSD family; the two-stage box head always uses it).
    cls_loss: str = "bce"
    box_loss: str = "ciou"
    cls_weight: float = 1.0
    box_weight: float = 5.0
    obj_weight: float = 1.0
    l1_weight: float = 0.0  # an extra L1 term on top of an IoU loss (0 = off)
    focal_gamma: float = 2.0
    # The weight of positives in the focal losses with hard 0/1 targets (the SSD family's classes,
    # obj_focal), in [0, 1]; negative turns the weighting off. The YOLO family's class loss with
    # focal is quality focal loss, which has none.
    focal_alpha: float = 0.25
    center_radius: float = 2.5
    obj_focal: bool = False
    # SSD-style families: hard-negative mining keeps this many background priors per positive
    # (softmax CE), and a prior is positive at IoU >= fg_iou with a ground truth.
    neg_pos_ratio: float = 3.0
    fg_iou: float = 0.5

    def __post_init__(self) -> None:
        if self.cls_loss not in CLS_LOSSES:
            raise ConfigError(f"loss.cls_loss must be one of {CLS_LOSSES}, got {self.cls_loss!r}")
        if self.box_loss not in BOX_LOSSES:
            raise ConfigError(f"loss.box_loss must be one of {BOX_LOSSES}, got {self.box_loss!r}")
        if not isinstance(self.obj_focal, bool):
            raise ConfigError(f"loss.obj_focal must be true or false, got {self.obj_focal!r}")
        for n in ("cls_weight", "box_weight", "obj_weight", "l1_weight", "focal_gamma", "center_radius",
                  "neg_pos_ratio", "focal_alpha", "fg_iou"):
            v = getattr(self, n)
            # NaN passes every "< 0" test and inf every ">= 0" one: both would train on NaN.
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"loss.{n} must be a finite number, got {v!r}")
            if n not in ("focal_alpha", "fg_iou") and v < 0:
                raise ConfigError(f"loss.{n} must be >= 0, got {v}")
        if self.focal_alpha > 1.0:  # alpha weighs positives, 1 - alpha negatives: past 1 a loss < 0
            raise ConfigError(f"loss.focal_alpha must be in [0, 1] (or negative: no alpha weighting), "
                              f"got {self.focal_alpha}")
        if not 0.0 < self.fg_iou < 1.0:
            raise ConfigError(f"loss.fg_iou must be in (0, 1), got {self.fg_iou}")


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, N) IoU between (M, 4) and (N, 4) xyxy boxes."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + EPS)


@torch.no_grad()
def simota_assign(
    pred: torch.Tensor, centers: torch.Tensor, strides: torch.Tensor, gt_boxes: torch.Tensor, gt_cls: torch.Tensor,
    num_classes: int, radius: float = 2.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign one image's anchors to ground truths.

    pred: (N, 5 + C) decoded boxes + obj/cls logits; centers (N, 2) px; strides (N,);
    gt_boxes (M, 4) xyxy px; gt_cls (M,) int64. Returns (fg_mask (N,) bool,
    matched_gt (num_fg,) int64 index into gt, matched_iou (num_fg,)).
    """
    n = pred.shape[0]
    m = gt_boxes.shape[0]
    if m == 0:
        return torch.zeros(n, dtype=torch.bool), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    cx, cy = centers[:, 0][None], centers[:, 1][None]
    in_box = (cx > gt_boxes[:, 0:1]) & (cx < gt_boxes[:, 2:3]) & (cy > gt_boxes[:, 1:2]) & (cy < gt_boxes[:, 3:4])
    gcx = (gt_boxes[:, 0:1] + gt_boxes[:, 2:3]) / 2
    gcy = (gt_boxes[:, 1:2] + gt_boxes[:, 3:4]) / 2
    r = radius * strides[None]
    in_ctr = ((cx - gcx).abs() < r) & ((cy - gcy).abs() < r)
    cand = (in_box | in_ctr).any(0)
    cidx = cand.nonzero(as_tuple=True)[0]
    if cidx.numel() == 0:
        return torch.zeros(n, dtype=torch.bool), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    p = pred[cidx]
    ious = pairwise_iou(gt_boxes, p[:, :4])  # (M, K)
    scores = (p[:, 5:].sigmoid() * p[:, 4:5].sigmoid()).sqrt().clamp(EPS, 1 - EPS)  # (K, C)
    onehot = F.one_hot(gt_cls, num_classes).float()  # (M, C)
    cls_cost = F.binary_cross_entropy(
        scores[None].expand(m, -1, -1), onehot[:, None].expand(-1, cidx.numel(), -1), reduction="none"
    ).sum(-1)
    both = (in_box & in_ctr)[:, cidx]
    cost = cls_cost + 3.0 * -torch.log(ious + EPS) + 1e5 * (~both).float()
    topk = min(10, cidx.numel())
    dyn_k = ious.topk(topk, dim=1).values.sum(1).int().clamp(min=1)
    match = torch.zeros_like(cost)
    for g in range(m):
        idx = cost[g].topk(int(dyn_k[g]), largest=False).indices
        match[g, idx] = 1.0
    multi = match.sum(0) > 1
    if multi.any():
        best = cost[:, multi].argmin(0)
        match[:, multi] = 0.0
        match[best, multi.nonzero(as_tuple=True)[0]] = 1.0
    fg_c = match.sum(0) > 0
    matched = match[:, fg_c].argmax(0)
    fg = torch.zeros(n, dtype=torch.bool)
    fg[cidx[fg_c]] = True
    return fg, matched, ious[matched, fg_c.nonzero(as_tuple=True)[0]]


# Class losses whose logits are read back through a per-class sigmoid, as the YOLO family's
# exported graph does (``yolo_obj``: score = sigmoid(obj) * sigmoid(class)). Softmax CE fixes only
# the differences between a cell's class logits, so their sigmoids, the served scores, would
# be arbitrary.
SIGMOID_CLS_LOSSES = ("bce", "focal")


def check_sigmoid_cls_loss(cfg: LossConfig, who: str) -> None:
    """ConfigError unless ``cfg.cls_loss`` trains per-class sigmoids (``who`` reads them so)."""
    if cfg.cls_loss not in SIGMOID_CLS_LOSSES:
        raise ConfigError(
            f"{who} reads class scores through a sigmoid: loss.cls_loss must be one of {SIGMOID_CLS_LOSSES}, "
            f"got {cfg.cls_loss!r} (softmax CE leaves the sigmoid scores it serves arbitrary; use bce or focal)"
        )


def set_but_unread(cfg: LossConfig, unread: dict[str, str]) -> list[str]:
    """The settings of ``unread`` (name -> when a family would read it, "" never) that ``cfg``
    moves off their defaults, as ``loss.name=value (when)``: a family's check at load
    (``TrainConfig``) refuses them, since they would change nothing in its training."""
    defaults = {f.name: f.default for f in fields(LossConfig)}
    return [f"loss.{n}={getattr(cfg, n)}" + (f" ({when})" if when else "")
            for n, when in unread.items() if getattr(cfg, n) != defaults[n]]


def yolo_ignored_settings(cfg: LossConfig) -> list[str]:
    """The settings ``cfg`` moves off their defaults that ``DetectionLoss`` does not read, worded
    as ``set_but_unread`` words them (``TrainConfig`` refuses them at load)."""
    unread = {"neg_pos_ratio": "", "fg_iou": ""}  # SSD-style matching and mining: SimOTA has neither
    if cfg.cls_loss != "focal" and not cfg.obj_focal:
        unread["focal_gamma"] = "read with loss.cls_loss focal or loss.obj_focal true"
    if not cfg.obj_focal:
        unread["focal_alpha"] = "read with loss.obj_focal true; the focal class loss here has none"
    return set_but_unread(cfg, unread)


class DetectionLoss:
    """Total loss over a batch of raw head maps.

    The YOLO family's loss (also the two-stage family's proposal network, with bce): class logits
    are trained as per-class sigmoids, so ``cfg.cls_loss`` must be ``bce`` or ``focal``. Their
    targets are soft (one-hot x the IoU of the assigned box), so ``focal`` is quality focal loss
    here, the form whose minimum is at the target (``focal_alpha`` does not apply); objectness
    targets are 0/1, and ``obj_focal`` is plain focal loss.

    ``__call__(decoded, centers, strides, targets, ignore=...)``: ``decoded`` (B, N, 5 + C) as
    ``Detector.decode`` gives it; ``targets`` is a list of (boxes (M, 4) xyxy input px, classes
    (M,)) per image; ``ignore`` (optional) a list of (K, 4) xyxy input px ignore regions (crowd
    boxes) per image: a cell whose centre is inside one and that is no positive has no objectness
    loss. Without regions the loss is what it is without ``ignore``.
    Returns (total, parts) with parts = {"box", "obj", "cls", "l1", "num_fg"}.
    """

    def __init__(self, cfg: LossConfig, num_classes: int) -> None:
        check_sigmoid_cls_loss(cfg, "the yolo family")
        self.cfg = cfg
        self.num_classes = num_classes

    def __call__(
        self,
        decoded: torch.Tensor,
        centers: torch.Tensor,
        strides: torch.Tensor,
        targets: list[tuple[torch.Tensor, torch.Tensor]],
        raw_flat: torch.Tensor | None = None,
        *,
        ignore: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        b = decoded.shape[0]
        if ignore is not None and len(ignore) != len(targets):
            raise ValueError(f"{len(targets)} target entries but {len(ignore)} ignore entries")
        obj_t = torch.zeros(decoded.shape[:2])
        ignored = torch.zeros(decoded.shape[:2], dtype=torch.bool)
        fg_all, cls_logits, cls_t, box_p, box_t, stride_fg = [], [], [], [], [], []
        for i, (gb, gc) in enumerate(targets):
            fg, mg, miou = simota_assign(decoded[i].detach(), centers, strides, gb, gc, self.num_classes,
                                         cfg.center_radius)
            fg_all.append(fg)
            if ignore is not None:
                ignored[i] = points_in_regions(centers, ignore[i]) & ~fg
            if mg.numel() == 0:
                continue
            obj_t[i, fg] = 1.0
            cls_logits.append(decoded[i, fg, 5:])
            cls_t.append(F.one_hot(gc[mg], self.num_classes).float() * miou[:, None].clamp(min=0.0))
            box_p.append(decoded[i, fg, :4])
            box_t.append(gb[mg])
            stride_fg.append(strides[fg])
        num_fg = max(1.0, float(sum(int(f.sum()) for f in fg_all)))
        obj_logits = decoded[..., 4]
        if cfg.obj_focal:
            obj = focal_loss(obj_logits, obj_t, cfg.focal_gamma, cfg.focal_alpha)
        else:
            obj = bce_loss(obj_logits, obj_t)
        if bool(ignored.any()):  # without ignore regions the sum (and its gradient) is untouched
            obj = obj.masked_fill(ignored, 0.0)
        l_obj = obj.sum() / num_fg
        zero = decoded.sum() * 0.0
        l_box = l_cls = l_l1 = zero
        if box_p:
            bp, bt, st = torch.cat(box_p), torch.cat(box_t), torch.cat(stride_fg)
            l_box = box_loss(bp, bt, cfg.box_loss, st).sum() / num_fg
            if cfg.l1_weight > 0:
                l_l1 = box_loss(bp, bt, "l1", st).sum() / num_fg
            cl = torch.cat(cls_logits)
            if cfg.cls_loss == "focal":
                l_cls = quality_focal_loss(cl, torch.cat(cls_t), cfg.focal_gamma).sum() / num_fg
            else:
                l_cls = bce_loss(cl, torch.cat(cls_t)).sum() / num_fg
        total = cfg.box_weight * l_box + cfg.obj_weight * l_obj + cfg.cls_weight * l_cls + cfg.l1_weight * l_l1
        parts = {"box": float(l_box.detach()), "obj": float(l_obj.detach()), "cls": float(l_cls.detach()),
                 "l1": float(l_l1.detach()), "num_fg": num_fg / b}
        return total, parts


def bernoulli_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Element-wise KL(sigmoid(teacher) || sigmoid(student)): 0 where the logits agree, > 0 elsewhere.

    BCE(student, p_t) - BCE(teacher, p_t), both with the teacher's probability as the soft target.
    """
    p = torch.sigmoid(teacher_logits)
    return (F.binary_cross_entropy_with_logits(student_logits, p, reduction="none")
            - F.binary_cross_entropy_with_logits(teacher_logits, p, reduction="none"))


def distillation_loss(student_raws: list[torch.Tensor], teacher_raws: list[torch.Tensor]) -> torch.Tensor:
    """Dense output distillation between two detectors with the same head layout (a pruned
    student and its unpruned teacher): per level (B, 4 + 1 + C, h, w) raw maps.

    Objectness and class logits are matched by Bernoulli KL, box parameters by L1. Every cell
    is weighted by max(teacher, student) objectness (detached), so the loss looks where either
    model sees an object - the teacher's detections and the student's false positives - instead of
    averaging over the empty background; the weights are normalised to sum to 1.
    """
    if len(student_raws) != len(teacher_raws):
        raise ValueError(f"{len(student_raws)} student levels vs {len(teacher_raws)} teacher levels")
    terms, weights = [], []
    for s, t in zip(student_raws, teacher_raws, strict=True):
        if s.shape != t.shape:
            raise ValueError(f"student map {tuple(s.shape)} vs teacher map {tuple(t.shape)}")
        w = torch.maximum(torch.sigmoid(t[:, 4]), torch.sigmoid(s[:, 4])).detach()  # (B, h, w)
        box = (s[:, :4] - t[:, :4]).abs().mean(1)
        obj = bernoulli_kl(s[:, 4], t[:, 4])
        cls = bernoulli_kl(s[:, 5:], t[:, 5:]).mean(1)
        terms.append((w * (box + obj + cls)).sum())
        weights.append(w.sum())
    return torch.stack(terms).sum() / torch.stack(weights).sum().clamp(min=1e-6)
