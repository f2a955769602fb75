"""The SSD family: priors, box coding, matching, the loss against values computed by hand (the
arithmetic is in the comments), ONNX export parity through the serving decoder, and training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from build_engine.losses import LossConfig
from build_engine.model import build_model
from build_engine.model.config import ModelConfig, preset
from build_engine.model.ssd import PRIOR_LEVELS, SsdDetector, SsdHead, make_priors
from build_engine.model.ssd_coding import cxcywh_to_xyxy, decode, encode
from build_engine.model.ssd_loss import match_priors, ssd_loss
from perception.errors import ConfigError

TINY = ModelConfig(family="ssd", width_mult=0.125, depth_mult=0.33, input_width=128, input_height=96)

# Three priors (cx, cy, w, h) on a 100x100 input and one ground truth (41, 42, 61, 62) px.
# Prior 0 is (40, 40, 60, 60) px: intersection 19 x 18 = 342, union 400 + 400 - 342 = 458,
# IoU 0.747 -> positive; priors 1 and 2 (corners) do not touch it -> negatives.
PRIORS = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]])
GT = (torch.tensor([[41.0, 42.0, 61.0, 62.0]]), torch.tensor([0]))
NO_GT = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
# One class: logits (background, class) per prior, channels-first (B, C + 1, N).
# Prior 0 (positive, label 1): (0, 0) -> CE log 2 = 0.693147.
# Prior 1: (2, 0) -> background CE log(1 + e^-2) = 0.126928.
# Prior 2: (0, 1) -> background CE log(1 + e) = 1.313262, the hardest negative.
LOGITS = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]])
# Offsets of prior 0 (0, 0, 0, 0.5); its target: centre (51, 52) vs (50, 50) px ->
# dx = 0.01 / (0.1 * 0.2) = 0.5, dy = 0.02 / 0.02 = 1; same size -> dw = dh = 0.
# Smooth-L1 (beta 1) of the differences (0.5, 1, 0, 0.5): 0.125 + 0.5 + 0 + 0.125 = 0.75.
OFFSETS = torch.tensor([[[0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])


def _loss(logits, offsets, targets, ignore=None, **kw):
    cfg = LossConfig(**{"cls_loss": "ce", "box_loss": "smooth_l1", "box_weight": 2.0, "neg_pos_ratio": 1.0, **kw})
    return ssd_loss(logits, offsets, PRIORS, targets, cfg, (100, 100), ignore)


def test_priors_count_order_and_size() -> None:
    p = make_priors(512, 288)
    # Cells: 64x36, 32x18, 16x9 and ceil(288 / 64) = 5 rows x 8 at stride 64; priors per cell:
    # stride 8: (4 + 4 + 1) centres x 3 ratios = 27, then 2 x 3 = 6, 6, 4 x 3 = 12.
    assert p.shape == (64 * 36 * 27 + 32 * 18 * 6 + 16 * 9 * 6 + 8 * 5 * 12, 4)
    assert [lv.per_cell for lv in PRIOR_LEVELS] == [27, 6, 6, 12]
    # First cell, first size (8 px), first of its 2x2 centres (2, 2) px, ratio 0.35 (tall).
    assert torch.allclose(p[0], torch.tensor([2 / 512, 2 / 288, 8 * math.sqrt(0.35) / 512, 8 / math.sqrt(0.35) / 288]))
    assert torch.allclose(p[27, :2], torch.tensor([(2 + 8) / 512, 2 / 288]))  # the next cell to the right
    assert float(p[:, 0].min()) > 0 and float(p[:, 0].max()) < 1 and float(p[:, 1].max()) < 1
    # The stride-64 level's 5 rows are spread evenly: centres at (i + 0.5) / 5.
    assert torch.allclose(p[-1, :2], torch.tensor([7.5 / 8, 4.5 / 5]))


def test_encode_decode_round_trip_and_serving_decoder() -> None:
    from perception.layouts.ssd import decode_offsets

    g = torch.Generator().manual_seed(0)
    priors = make_priors(256, 160)[torch.randperm(18624, generator=g)[:500]]
    xy = torch.rand(500, 2, generator=g)
    boxes = torch.cat([xy, xy + 0.01 + 0.5 * torch.rand(500, 2, generator=g)], 1)
    offsets = encode(boxes, priors)
    assert torch.allclose(decode(offsets, priors), boxes, atol=1e-4)
    serving = decode_offsets(offsets.numpy(), priors.numpy(), (0.1, 0.2))
    np.testing.assert_allclose(decode(offsets, priors).numpy(), serving, atol=1e-6)


def test_matching_forces_each_ground_truths_best_prior() -> None:
    # Prior 0 (-0.05, -0.05)-(0.15, 0.15) holds GT 0 (0, 0)-(0.1, 0.1): IoU 0.01 / 0.04 = 0.25 < 0.5,
    # but it is GT 0's best prior. Priors 1 and 2 overlap GT 1 at IoU 1 and 0.64.
    priors = torch.tensor([[0.05, 0.05, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2], [0.6, 0.6, 0.16, 0.16], [0.9, 0.1, 0.1, 0.1]])
    gt = torch.tensor([[0.0, 0.0, 0.1, 0.1], [0.5, 0.5, 0.7, 0.7]])
    idx, pos = match_priors(cxcywh_to_xyxy(priors), gt, 0.5)
    assert pos.tolist() == [True, True, True, False]
    assert idx[:3].tolist() == [0, 1, 1]
    _, pos_high = match_priors(cxcywh_to_xyxy(priors), gt, 0.7)
    assert pos_high.tolist() == [True, True, False, False]  # 0.64 < 0.7; the forced prior stays


def test_ce_with_hard_negative_mining_and_smooth_l1_by_hand() -> None:
    total, parts = _loss(LOGITS, OFFSETS, [GT])
    # One positive, neg_pos_ratio 1: prior 2 is mined (1.313262 > 0.126928).
    assert parts["cls"] == pytest.approx(0.693147 + 1.313262, abs=1e-5)
    assert parts["box"] == pytest.approx(0.75, abs=1e-5)
    assert parts["num_pos"] == 1.0
    assert float(total) == pytest.approx(0.693147 + 1.313262 + 2.0 * 0.75, abs=1e-5)
    # neg_pos_ratio 2 takes both negatives.
    _, parts = _loss(LOGITS, OFFSETS, [GT], neg_pos_ratio=2.0)
    assert parts["cls"] == pytest.approx(0.693147 + 1.313262 + 0.126928, abs=1e-5)


def test_image_without_objects_mines_negatives_and_has_no_box_term() -> None:
    # Alone: it mines neg_pos_ratio x 1 negatives (prior 2), normalised by max(1, 0 positives).
    total, parts = _loss(LOGITS, OFFSETS, [NO_GT])
    assert math.isfinite(float(total)) and parts["box"] == 0.0 and parts["num_pos"] == 0.0
    assert parts["cls"] == pytest.approx(1.313262, abs=1e-5)
    # In a batch with the image above: one positive in all, each image mines its own negative.
    _, parts = _loss(LOGITS.repeat(2, 1, 1), OFFSETS.repeat(2, 1, 1), [GT, NO_GT])
    assert parts["cls"] == pytest.approx(0.693147 + 2 * 1.313262, abs=1e-5)
    assert parts["box"] == pytest.approx(0.75, abs=1e-5) and parts["num_pos"] == 0.5


def test_priors_in_a_crowd_region_are_no_negatives() -> None:
    """A crowd box (one box around a group) was trained as background: its priors were mined as
    the hardest negatives. Now a prior that is no positive and lies in one (IoF >= 0.5) is never
    a negative; a positive inside it and the priors outside train as before."""
    crowd = [torch.tensor([[80.0, 80.0, 100.0, 100.0]])]  # holds prior 2, (85, 85)-(95, 95) px
    logits = LOGITS.clone().requires_grad_(True)
    # ce, one negative per image without objects: prior 2 (1.313262) was mined; now prior 0 (log 2).
    total, parts = _loss(logits, OFFSETS, [NO_GT], ignore=crowd)
    assert parts["cls"] == pytest.approx(0.693147, abs=1e-5)
    (grad,) = torch.autograd.grad(total, logits)
    assert (grad[0, :, 2] == 0).all() and (grad[0, :, 0] != 0).all()
    before, parts = _loss(logits, OFFSETS, [NO_GT])
    assert parts["cls"] == pytest.approx(1.313262, abs=1e-5)
    assert (torch.autograd.grad(before, logits)[0][0, :, 2] != 0).all()
    # Three negatives asked for, two left once prior 2 is ignored: priors 0 and 1.
    _, parts = _loss(LOGITS, OFFSETS, [NO_GT], ignore=crowd, neg_pos_ratio=3.0)
    assert parts["cls"] == pytest.approx(0.693147 + 0.126928, abs=1e-5)
    # A region over the ground truth too: prior 0 stays positive, prior 1 is the mined negative.
    _, parts = _loss(LOGITS, OFFSETS, [GT], ignore=[torch.tensor([[30.0, 30.0, 100.0, 100.0]])])
    assert parts["cls"] == pytest.approx(0.693147 + 0.126928, abs=1e-5) and parts["num_pos"] == 1.0
    assert parts["box"] == pytest.approx(0.75, abs=1e-5)
    # focal: prior 2's 0.526396 goes; priors 0 and 1 (target 0, logit 0) keep 0.129965 each.
    total, parts = _loss(logits, OFFSETS, [NO_GT], ignore=crowd, cls_loss="focal")
    assert parts["cls"] == pytest.approx(2 * 0.129965, abs=1e-5)
    (grad,) = torch.autograd.grad(total, logits)
    assert (grad[0, :, 2] == 0).all() and (grad[0, 1:, :2] != 0).all()
    _, parts = _loss(logits, OFFSETS, [NO_GT], cls_loss="focal")
    assert parts["cls"] == pytest.approx(2 * 0.129965 + 0.526396, abs=1e-5)
    with pytest.raises(ValueError, match="1 target entries but 2 ignore entries"):
        _loss(LOGITS, OFFSETS, [NO_GT], ignore=crowd * 2)


def test_iou_box_loss_on_decoded_boxes_plus_offset_term_by_hand() -> None:
    # Zero offsets decode to prior 0 itself, (40, 40, 60, 60) px: IoU 342 / 458 = 0.746725;
    # enclosing box (40, 40)-(61, 62), area 462: GIoU = 0.746725 - (462 - 458) / 462 = 0.738067.
    # The offset term (l1_weight): smooth-L1 of (0.5, 1, 0, 0) = 0.125 + 0.5 = 0.625.
    zero = torch.zeros(1, 3, 4)
    total, parts = _loss(LOGITS, zero, [GT], box_loss="giou", l1_weight=0.5)
    assert parts["box"] == pytest.approx(1 - 0.738067, abs=1e-5)
    assert parts["l1"] == pytest.approx(0.625, abs=1e-5)
    assert float(total) == pytest.approx(parts["cls"] + 2.0 * (1 - 0.738067) + 0.5 * 0.625, abs=1e-5)
    # Offsets that encode the ground truth exactly leave no box loss.
    exact = encode(GT[0] / 100, PRIORS[:1]).expand(1, 3, 4)
    _, parts = _loss(LOGITS, exact, [GT], box_loss="ciou")
    assert parts["box"] == pytest.approx(0.0, abs=1e-5)


def test_focal_loss_by_hand_and_sigmoid_scores() -> None:
    # Sigmoid focal (gamma 2, alpha 0.25) on the class column, every prior, no mining:
    # prior 0, target 1, logit 0: 0.25 * 0.5^2 * log 2 = 0.043322;
    # prior 1, target 0, logit 0: 0.75 * 0.5^2 * log 2 = 0.129965;
    # prior 2, target 0, logit 1: p = 0.731059, 0.75 * p^2 * log(1 + e) = 0.526396.
    _, parts = _loss(LOGITS, OFFSETS, [GT], cls_loss="focal")
    assert parts["cls"] == pytest.approx(0.043322 + 0.129965 + 0.526396, abs=1e-5)
    # A detector trained with focal loss serves per-class sigmoids (background = 1 - max).
    torch.manual_seed(0)
    model = build_model(TINY)
    assert isinstance(model, SsdDetector)
    model.train()
    model.training_loss(torch.rand(1, 3, 96, 128), [NO_GT], LossConfig(cls_loss="focal"))
    model.eval()
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        _, scores = model(x)
        logits, _ = model.forward_raw(x)
    fg = logits[:, 1:].sigmoid().transpose(1, 2)
    assert torch.allclose(scores[..., 1:], fg) and torch.allclose(scores[..., 0], 1 - fg.amax(-1))
    assert model.state_dict()["sigmoid_scores"].item() is True  # travels with checkpoints / EMA


def test_rejects_classification_losses_without_a_background() -> None:
    with pytest.raises(ConfigError, match="cls_loss"):
        _loss(LOGITS, OFFSETS, [GT], cls_loss="bce")


def test_edge_width_within_mac_budget() -> None:
    from build_engine.profile import profile_model

    model = build_model(preset("edge", family="ssd"))
    assert isinstance(model, SsdDetector) and model.output_layout == "ssd"
    assert profile_model(model, (1, 3, 288, 512)).total_macs <= 800e6


def _tiny_ssd(seed: int = 0) -> SsdDetector:
    torch.manual_seed(seed)
    model = build_model(TINY)
    assert isinstance(model, SsdDetector)
    for m in model.modules():  # variance-preserving init, so the untrained head is not constant
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    for head in model.heads:
        assert isinstance(head, SsdHead)
        nn.init.normal_(head.box_pred.weight, std=0.05)
        nn.init.normal_(head.cls_pred.weight, std=0.5)
    return model.eval()


def test_export_parity_through_the_serving_decoder(tmp_path) -> None:
    import onnxruntime as ort

    from build_engine.export import export_onnx
    from build_engine.fold import fold_batchnorm
    from perception.layouts.base import DecodeContext
    from perception.layouts.ssd import Ssd
    from perception.options import PostprocessOptions

    model = _tiny_ssd()
    folded, _ = fold_batchnorm(model)
    path = export_onnx(folded, tmp_path / "ssd.onnx", (96, 128))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["boxes", "scores"]
    n = make_priors(128, 96).shape[0]
    opts = PostprocessOptions(score_threshold=0.3, iou_threshold=0.5, max_detections=100, pre_nms_topk=100_000)
    ctx = DecodeContext(128, 96)
    rng = np.random.default_rng(0)
    for b in (1, 3):  # dynamic batch
        x = rng.random((b, 3, 96, 128), dtype=np.float32)
        with torch.no_grad():
            ref = [t.numpy() for t in model(torch.from_numpy(x))]
        boxes, scores = sess.run(None, {"images": x})
        assert boxes.shape == (b, n, 4) and scores.shape == (b, n, 8)
        np.testing.assert_allclose(boxes, ref[0], atol=1e-4)
        np.testing.assert_allclose(scores, ref[1], atol=1e-4)
        np.testing.assert_allclose(scores.sum(-1), 1.0, atol=1e-5)
        for i in range(b):
            got = Ssd().candidates({"boxes": boxes[i], "scores": scores[i]}, opts, 7, ctx)
            want = Ssd().candidates({"boxes": ref[0][i], "scores": ref[1][i]}, opts, 7, ctx)
            assert len(want) > 0
            order_g, order_w = np.lexsort((got.scores, got.class_ids)), np.lexsort((want.scores, want.class_ids))
            np.testing.assert_array_equal(got.class_ids[order_g], want.class_ids[order_w])
            np.testing.assert_allclose(got.boxes[order_g], want.boxes[order_w], atol=1e-2)  # pixels


def test_training_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    model = build_model(TINY)
    assert isinstance(model, SsdDetector)
    model.train()
    # Four images with two flat-coloured rectangles each (class = colour), on grey.
    images = torch.full((4, 3, 96, 128), 0.5)
    targets = []
    for i in range(4):
        boxes = torch.tensor([[10.0 + 8 * i, 12.0, 40.0 + 8 * i, 60.0], [70.0, 30.0 + 4 * i, 110.0, 56.0 + 4 * i]])
        for (x1, y1, x2, y2), c in zip(boxes.int().tolist(), (0, 1), strict=True):
            images[i, :, y1:y2, x1:x2] = torch.tensor([1.0, 0.0, 0.0] if c == 0 else [0.0, 0.0, 1.0])[:, None, None]
        targets.append((boxes, torch.tensor([0, 1])))
    cfg = LossConfig(cls_loss="ce", box_loss="ciou", box_weight=2.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss, parts = model.training_loss(images, targets, cfg)
        assert parts["num_pos"] > 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0]
