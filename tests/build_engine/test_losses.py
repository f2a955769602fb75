"""Each loss against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from build_engine.losses import (
    DetectionLoss,
    LossConfig,
    bce_loss,
    bernoulli_kl,
    box_iou_pairs,
    box_loss,
    ce_loss,
    distillation_loss,
    focal_loss,
    quality_focal_loss,
    simota_assign,
)
from perception.errors import ConfigError

A = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
B = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
# A and B: intersection 1, union 4 + 4 - 1 = 7, IoU 1/7; enclosing box (0,0)-(3,3) area 9;
# centres (1,1) and (2,2): rho^2 = 2; enclosing diagonal^2 = 18.


def test_bce() -> None:
    # -log(sigmoid(0)) = log 2 for either target; target 1 at logit 2: log(1 + e^-2).
    got = bce_loss(torch.tensor([0.0, 2.0, 2.0]), torch.tensor([1.0, 1.0, 0.0]))
    want = torch.tensor([math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))])
    assert torch.allclose(got, want, atol=1e-6)


def test_focal() -> None:
    # logit 0, target 1: p_t = 0.5, CE = log 2; (1 - 0.5)^2 = 0.25; alpha_t = 0.25 -> 0.0625 log 2.
    positive = focal_loss(torch.tensor([0.0]), torch.tensor([1.0]), 2.0, 0.25).item()
    assert positive == pytest.approx(0.0625 * math.log(2), abs=1e-7)
    # target 0: alpha_t = 0.75 -> 0.1875 log 2; gamma 0 and no alpha is plain BCE.
    negative = focal_loss(torch.tensor([0.0]), torch.tensor([0.0]), 2.0, 0.25).item()
    assert negative == pytest.approx(0.1875 * math.log(2), abs=1e-7)
    x, t = torch.tensor([1.3, -0.4]), torch.tensor([1.0, 0.0])
    assert torch.allclose(focal_loss(x, t, 0.0, -1.0), bce_loss(x, t))


def test_quality_focal_loss_is_minimised_at_the_target() -> None:
    """The YOLO family's class targets are soft (one-hot x IoU). Focal loss trains target 0.3
    towards 0.12 and 0.9 towards 0.99; quality focal loss, like BCE, towards the target."""
    logits = torch.linspace(-8.0, 8.0, 16001)
    for t in (0.1, 0.3, 0.6, 0.75, 0.9):
        targets = torch.full_like(logits, t)
        best = torch.sigmoid(logits[quality_focal_loss(logits, targets, 2.0).argmin()]).item()
        assert best == pytest.approx(t, abs=1e-3)
        focal_best = torch.sigmoid(logits[focal_loss(logits, targets, 2.0, 0.25).argmin()]).item()
        assert abs(focal_best - t) > 0.03  # what it replaces in that family
    # Logit 0, target 0.3: BCE log 2 (p = 0.5 either way), |0.3 - 0.5|^2 = 0.04 -> 0.04 log 2.
    by_hand = quality_focal_loss(torch.tensor([0.0]), torch.tensor([0.3]), 2.0).item()
    assert by_hand == pytest.approx(0.04 * math.log(2), abs=1e-7)
    # Hard targets: |t - p| = 1 - p_t, so it is focal loss without alpha (quality focal loss has none).
    x = torch.linspace(-6.0, 6.0, 25)
    for hard in (0.0, 1.0):
        hard_t = torch.full_like(x, hard)
        for gamma in (2.0, 1.5):
            torch.testing.assert_close(quality_focal_loss(x, hard_t, gamma), focal_loss(x, hard_t, gamma, -1.0))


def test_ce() -> None:
    # logits (0, ln 3): softmax (1/4, 3/4); target 1 -> -ln(3/4).
    got = ce_loss(torch.tensor([[0.0, math.log(3)]]), torch.tensor([1]))
    assert got.item() == pytest.approx(-math.log(0.75), abs=1e-6)


def test_iou_family_by_hand() -> None:
    iou = 1 / 7
    assert box_iou_pairs(A, B, "iou").item() == pytest.approx(iou, abs=1e-6)
    assert box_iou_pairs(A, B, "giou").item() == pytest.approx(iou - (9 - 7) / 9, abs=1e-6)
    assert box_iou_pairs(A, B, "diou").item() == pytest.approx(iou - 2 / 18, abs=1e-6)
    # Same aspect ratio: CIoU's v term is 0, so CIoU = DIoU.
    assert box_iou_pairs(A, B, "ciou").item() == pytest.approx(iou - 2 / 18, abs=1e-6)
    assert box_loss(A, B, "giou").item() == pytest.approx(1 - (iou - 2 / 9), abs=1e-6)


def test_ciou_aspect_term() -> None:
    # Same centre (rho = 0): pred 2x2 inside target 4x2 at (0,0)-(4,2), pred (1,0)-(3,2).
    p, t = torch.tensor([[1.0, 0.0, 3.0, 2.0]]), torch.tensor([[0.0, 0.0, 4.0, 2.0]])
    iou = 4 / 8
    v = 4 / math.pi**2 * (math.atan(4 / 2) - math.atan(2 / 2)) ** 2
    alpha = v / (v - iou + 1)
    assert box_iou_pairs(p, t, "ciou").item() == pytest.approx(iou - alpha * v, abs=1e-6)


def test_l1_mse_with_stride_norm() -> None:
    p, t = torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[2.0, 0.0, 10.0, 14.0]])
    # differences (-2, 0, 0, -4) / stride 2 -> (-1, 0, 0, -2): L1 3, MSE 5.
    assert box_loss(p, t, "l1", torch.tensor([2.0])).item() == pytest.approx(3.0)
    assert box_loss(p, t, "mse", torch.tensor([2.0])).item() == pytest.approx(5.0)
    assert box_loss(t, t, "ciou").item() == pytest.approx(0.0, abs=1e-6)


def test_loss_config_validation() -> None:
    with pytest.raises(ConfigError):
        LossConfig(box_loss="smooth")
    with pytest.raises(ConfigError):
        LossConfig(cls_weight=-1)


def _setup() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # 4x4 grid of stride-8 cells (32x32 image).
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    centers = torch.stack([xs, ys], -1).reshape(-1, 2) * 8 + 4
    strides = torch.full((16,), 8.0)
    return centers, strides, torch.zeros(16, 5 + 2)


def test_assignment_picks_cells_inside_the_object() -> None:
    centers, strides, pred = _setup()
    pred[:, :4] = torch.cat([centers - 4, centers + 4], 1)  # each cell predicts its own 8x8 box
    gt = torch.tensor([[8.0, 8.0, 16.0, 16.0]])  # exactly cell (1, 1) -> index 5
    fg, matched, iou = simota_assign(pred, centers, strides, gt, torch.tensor([1]), 2)
    assert fg.nonzero().flatten().tolist() == [5]
    assert matched.tolist() == [0] and iou.item() == pytest.approx(1.0, abs=1e-5)


def test_detection_loss_weights_and_no_objects() -> None:
    centers, strides, pred = _setup()
    pred[:, :4] = torch.cat([centers - 4, centers + 4], 1)
    pred = pred[None].clone().requires_grad_(True)
    # No ground truth: only objectness counts; 16 cells at logit 0 -> 16 log 2 (num_fg floor 1).
    no_objects = [(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))]
    total, parts = DetectionLoss(LossConfig(), 2)(pred, centers, strides, no_objects)
    assert total.item() == pytest.approx(16 * math.log(2), abs=1e-5) and parts["box"] == 0.0
    total.backward()
    assert pred.grad is not None
    # With one perfectly boxed object: box loss 0; obj = 16 log 2 (BCE at logit 0 is log 2 either way);
    # cls target (0, 1) * IoU 1 at logits 0 -> 2 log 2. Weights scale each part.
    gt = [(torch.tensor([[8.0, 8.0, 16.0, 16.0]]), torch.tensor([1]))]
    cfg = LossConfig(cls_weight=2.0, obj_weight=0.5, box_weight=5.0)
    total, parts = DetectionLoss(cfg, 2)(pred.detach(), centers, strides, gt)
    assert parts["box"] == pytest.approx(0.0, abs=1e-5)
    assert parts["obj"] == pytest.approx(16 * math.log(2), abs=1e-5)
    assert parts["cls"] == pytest.approx(2 * math.log(2), abs=1e-5)
    assert total.item() == pytest.approx(0.5 * 16 * math.log(2) + 2.0 * 2 * math.log(2), abs=1e-4)


def test_the_yolo_focal_class_loss_is_at_rest_when_the_score_is_the_target() -> None:
    """The class target of an assigned cell is its box's IoU (0.75 here). With ``focal`` the class
    loss and its gradient vanish where the class score is 0.75; plain focal loss (the old
    ``focal``) still pushed it, towards 0.92."""
    centers, strides, pred = _setup()
    pred[:, :4] = torch.cat([centers - 4, centers + 4], 1)
    pred[5, :4] = torch.tensor([8.0, 8.0, 16.0, 14.0])  # cell 5 (centre (12, 12)): IoU 48 / 64 with the object
    pred[5, 5:] = torch.tensor([-30.0, math.log(3.0)])  # class scores (~0, 0.75)
    pred = pred[None].clone().requires_grad_(True)
    gt = [(torch.tensor([[8.0, 8.0, 16.0, 16.0]]), torch.tensor([1]))]
    total, parts = DetectionLoss(LossConfig(cls_loss="focal"), 2)(pred, centers, strides, gt)
    assert parts["num_fg"] == 1.0
    assert parts["cls"] == pytest.approx(0.0, abs=1e-9)
    (grad,) = torch.autograd.grad(total, pred)
    assert grad[0, 5, 5:].abs().max().item() < 1e-6


def test_cells_in_a_crowd_region_get_no_objectness_loss() -> None:
    """A crowd box (one box around a group) was trained as background: every cell in it was
    pushed towards "no object". Now a cell whose centre lies in it and that holds no object is
    neither positive nor negative; the cells outside, and an object's cell inside, train as before."""
    centers, strides, pred = _setup()
    pred[:, :4] = torch.cat([centers - 4, centers + 4], 1)
    pred = pred[None].clone().requires_grad_(True)
    crowd = [torch.tensor([[0.0, 0.0, 16.0, 32.0]])]  # the left two columns: 8 of the 16 cell centres
    no_objects = [(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))]
    inside = centers[:, 0] < 16
    for obj_focal in (False, True):
        loss = DetectionLoss(LossConfig(obj_focal=obj_focal), 2)
        total, parts = loss(pred, centers, strides, no_objects, ignore=crowd)
        before, _ = loss(pred, centers, strides, no_objects)
        # BCE at logit 0 is log 2 per cell; focal (gamma 2, alpha 0.25) at target 0: 0.75 * 0.25 log 2.
        per_cell = 0.1875 * math.log(2) if obj_focal else math.log(2)
        assert parts["obj"] == pytest.approx(8 * per_cell, abs=1e-5)
        assert before.item() == pytest.approx(16 * per_cell, abs=1e-5)
        (grad,) = torch.autograd.grad(total, pred)
        assert (grad[0, inside, 4] == 0).all() and (grad[0, ~inside, 4] != 0).all()
        (grad_before,) = torch.autograd.grad(before, pred)
        assert (grad_before[0, inside, 4] != 0).all()
    # An object inside the crowd box keeps its cell (5, centre (12, 12)) positive: 1 + 8 cells.
    gt = [(torch.tensor([[8.0, 8.0, 16.0, 16.0]]), torch.tensor([1]))]
    _, parts = DetectionLoss(LossConfig(), 2)(pred.detach(), centers, strides, gt, ignore=crowd)
    assert parts["obj"] == pytest.approx(9 * math.log(2), abs=1e-5) and parts["num_fg"] == 1.0
    # No regions: exactly the loss without them.
    empty = [torch.zeros(0, 4)]
    assert torch.equal(DetectionLoss(LossConfig(), 2)(pred, centers, strides, gt, ignore=empty)[0],
                       DetectionLoss(LossConfig(), 2)(pred, centers, strides, gt)[0])
    with pytest.raises(ValueError, match="1 target entries but 2 ignore entries"):
        DetectionLoss(LossConfig(), 2)(pred, centers, strides, gt, ignore=empty * 2)


def test_bernoulli_kl_by_hand() -> None:
    # teacher p = 0.75 (logit ln 3), student p = 0.5 (logit 0):
    # 0.75 ln(0.75 / 0.5) + 0.25 ln(0.25 / 0.5) = 0.130812
    kl = bernoulli_kl(torch.tensor([0.0]), torch.tensor([math.log(3.0)]))
    assert kl.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert bernoulli_kl(torch.tensor([1.3, -2.0]), torch.tensor([1.3, -2.0])).abs().max().item() < 1e-6


def test_distillation_loss_by_hand() -> None:
    c = 4 + 1 + 2
    teacher = torch.zeros(1, c, 1, 1)  # objectness logit 0 -> weight 0.5
    student = teacher.clone()
    assert distillation_loss([student], [teacher]).item() == pytest.approx(0.0, abs=1e-7)
    student[0, 0] = 1.0  # one box parameter off by 1: L1 mean over 4 = 0.25, weight cancels
    assert distillation_loss([student], [teacher]).item() == pytest.approx(0.25, abs=1e-6)
    # A second, empty-looking cell (both objectness logits -20) barely counts.
    t2, s2 = torch.full((1, c, 1, 2), -20.0), torch.full((1, c, 1, 2), -20.0)
    t2[..., 0], s2[..., 0] = teacher[..., 0], student[..., 0]
    s2[0, 0, 0, 1] = 5.0
    assert distillation_loss([s2], [t2]).item() == pytest.approx(0.25, abs=1e-4)
    with pytest.raises(ValueError):
        distillation_loss([student], [torch.zeros(1, c, 2, 2)])


def test_the_yolo_loss_refuses_softmax_ce() -> None:
    """The YOLO family serves sigmoid(obj) * sigmoid(class); softmax CE only fixes the
    differences between a cell's class logits, so those scores would be arbitrary."""
    with pytest.raises(ConfigError, match="cls_loss.*use bce or focal"):
        DetectionLoss(LossConfig(cls_loss="ce"), 2)
    for ok in ("bce", "focal"):
        DetectionLoss(LossConfig(cls_loss=ok), 2)
    LossConfig(cls_loss="ce")  # still a valid config: the SSD family trains with it


def test_a_yolo_config_with_softmax_ce_is_refused_when_loaded() -> None:
    """At load, not at the first batch of a training run minutes later."""
    from build_engine.config import ModelConfig, TrainConfig

    with pytest.raises(ConfigError, match="use bce or focal"):
        TrainConfig(model=ModelConfig(family="yolo"), loss=LossConfig(cls_loss="ce"))
    TrainConfig(model=ModelConfig(family="ssd"), loss=LossConfig(cls_loss="ce"))


def test_focal_losses_have_finite_gradients_at_saturated_logits() -> None:
    """With 0 < gamma < 1, (1 - p_t)^gamma has an infinite slope at 0, where a saturated logit
    puts it in float32: 0 x inf, a NaN gradient that clip_grad_norm_ spread to every parameter.
    Quality focal loss likewise where the score is its target exactly."""
    for gamma in (0.5, 2.0):
        x = torch.tensor([-30.0, 30.0, -120.0, 120.0, 0.0], requires_grad=True)
        t = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5])
        for loss in (focal_loss(x[:4], t[:4], gamma, 0.25), quality_focal_loss(x, t, gamma)):
            (grad,) = torch.autograd.grad(loss.sum(), x)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (gamma, loss, grad)
            assert float(loss.sum()) < 1e-6  # every prediction is (all but) right
        # Unsaturated logits: the formulas exactly, alpha_t (1 - p_t)^gamma BCE and |t - p|^gamma BCE.
        x, t = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([1.0, 0.0, 0.7])
        p = torch.sigmoid(x)
        bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
        p_t = torch.where(t[:2] == 1, p[:2], 1 - p[:2])
        alpha_t = torch.where(t[:2] == 1, 0.25, 0.75)
        want = alpha_t * (1 - p_t) ** gamma * bce[:2]
        assert torch.allclose(focal_loss(x[:2], t[:2], gamma, 0.25), want, atol=1e-6)
        assert torch.allclose(quality_focal_loss(x, t, gamma), (t - p).abs() ** gamma * bce, atol=1e-6)


@pytest.mark.parametrize("kw", [{"cls_weight": math.nan}, {"box_weight": math.inf}, {"focal_gamma": math.nan},
                                {"neg_pos_ratio": math.inf}, {"focal_alpha": math.nan}, {"focal_alpha": 2.0}])
def test_loss_config_refuses_non_finite_numbers_and_alpha_past_one(kw) -> None:
    """NaN passed the ">= 0" checks (every comparison with it is false); alpha 2 made the
    negatives' weight 1 - alpha negative: a loss that rewards being wrong."""
    (name,) = kw
    with pytest.raises(ConfigError, match=f"loss.{name} must be"):
        LossConfig(**kw)
    LossConfig(focal_alpha=-1.0)  # negative: no alpha weighting, as focal_loss documents
