"""Crowd boxes as ignore regions in the three families' losses, on tiny real models: without
regions training is exactly what it was; with one, the predictions in it get no negative
(objectness / background) loss and those outside still do."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from build_engine.ignore_regions import box_iof, boxes_in_regions, points_in_regions
from build_engine.losses import LossConfig
from build_engine.model import build_model, preset
from build_engine.model.detector import Detector
from build_engine.model.rcnn import RcnnDetector
from build_engine.model.ssd import SsdDetector
from build_engine.model.ssd_coding import cxcywh_to_xyxy

W, H = 128, 96
# The left half of the input: a region with cells, priors and proposals on both sides of it.
CROWD = torch.tensor([[0.0, 0.0, 64.0, 96.0]])
NO_OBJECTS = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
FAMILIES = {"yolo": LossConfig(), "ssd": LossConfig(cls_loss="ce"), "ssd-focal": LossConfig(cls_loss="focal"),
            "rcnn": LossConfig(box_loss="giou")}


Family = Detector | SsdDetector | RcnnDetector


def tiny_model(family: str) -> Family:
    torch.manual_seed(0)
    model = build_model(preset("pico", input_width=W, input_height=H, family=family.split("-")[0]))
    assert isinstance(model, (Detector, SsdDetector, RcnnDetector))
    return model.train()


def batch() -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Two images: one with two objects, one without."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, H, W, generator=gen)
    images[0, :, 20:60, 10:50] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    targets = [(torch.tensor([[10.0, 20.0, 50.0, 60.0], [70.0, 30.0, 110.0, 80.0]]), torch.tensor([0, 2])),
               NO_OBJECTS]
    return images, targets


def test_box_iof_and_membership_by_hand() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [6.0, 0.0, 16.0, 10.0], [3.0, 3.0, 3.0, 9.0]])
    region = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    # Intersections 100, 50, 40 and 0 over the boxes' own areas 100, 100, 100 and 0 (no area: 0).
    assert box_iof(boxes, region)[:, 0].tolist() == pytest.approx([1.0, 0.5, 0.4, 0.0])
    assert boxes_in_regions(boxes, region).tolist() == [True, True, False, False]
    assert boxes_in_regions(boxes, torch.zeros(0, 4)).tolist() == [False] * 4
    # Points strictly inside, as SimOTA's candidate test: on the edge is outside.
    points = torch.tensor([[5.0, 5.0], [10.0, 5.0], [0.0, 5.0], [11.0, 5.0]])
    assert points_in_regions(points, region).tolist() == [True, False, False, False]
    assert points_in_regions(points, torch.zeros(0, 4)).tolist() == [False] * 4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_without_crowd_regions_the_loss_and_gradients_are_unchanged(family: str) -> None:
    """Generated data has no crowd regions: the trainer passes an empty ignore set per image, and
    the loss and every gradient must be bit for bit those of a call without one (so a shipped
    recipe, ``scripts/train_default.sh``, reproduces)."""
    images, targets = batch()
    model = tiny_model(family)
    runs = []
    for ignore in (None, [torch.zeros(0, 4), torch.zeros(0, 4)]):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the two-stage family samples RoIs with the global RNG
        loss, parts = model.training_loss(images, targets, FAMILIES[family], ignore=ignore)
        loss.backward()
        runs.append((loss.detach(), parts, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, parts_a, grads_a), (loss_b, parts_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b) and parts_a == parts_b
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def _retain(monkeypatch: pytest.MonkeyPatch, model: Family, name: str, pick: Callable) -> list[torch.Tensor]:
    """Wrap ``model.<name>`` so the tensor ``pick(output)`` keeps its gradient; returns where it lands."""
    kept: list[torch.Tensor] = []
    inner = getattr(model, name)

    def wrapped(*args: object) -> object:
        out = inner(*args)
        t = pick(out)
        t.retain_grad()
        kept.append(t)
        return out

    monkeypatch.setattr(model, name, wrapped)
    return kept


def _grads_in_and_out(
    monkeypatch: pytest.MonkeyPatch, model: Family, name: str, pick: Callable, per_prediction: Callable,
    cfg: LossConfig, ignore: list[torch.Tensor] | None,
) -> torch.Tensor:
    """(B, N) size of the loss's gradient on each prediction of an image without objects."""
    kept = _retain(monkeypatch, model, name, pick)
    images = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    loss, _ = model.training_loss(images, [NO_OBJECTS], cfg, ignore=ignore)
    loss.backward()
    monkeypatch.undo()
    assert len(kept) == 1 and kept[0].grad is not None
    return per_prediction(kept[0].grad)


def _cell_mask(model: Detector | RcnnDetector) -> torch.Tensor:
    """(N,) cells whose centre is in CROWD, in the output order."""
    centers = torch.cat([(model.grid(i, H // s, W // s)[0] + 0.5) * s for i, s in enumerate(model.strides)])
    assert 0 < int((centers[:, 0] < 64).sum()) < centers.shape[0]
    return centers[:, 0] < 64


@pytest.mark.parametrize("family", ["yolo", "rcnn"])
def test_cells_in_a_crowd_region_get_no_objectness_loss(monkeypatch: pytest.MonkeyPatch, family: str) -> None:
    """The YOLO family's cells and the two-stage family's proposal cells: with one crowd box over
    the left half and no objects, objectness gradient only outside it (before: everywhere)."""
    model = tiny_model(family)
    assert not isinstance(model, SsdDetector)
    inside = _cell_mask(model)
    if isinstance(model, Detector):
        name, pick = "decode", lambda out: out  # (B, N, 5 + C)
    else:
        name, pick = "features", lambda out: out[1]  # the RPN's (B, N, 6)
    grads = {}
    for ignore in (None, [CROWD]):
        g = _grads_in_and_out(monkeypatch, model, name, pick, lambda g: g[..., 4].abs(), FAMILIES[family], ignore)
        grads[ignore is None] = g[0]
    assert (grads[False][inside] == 0).all() and (grads[False][~inside] > 0).all()
    assert (grads[True][inside] > 0).all()  # trained as background without the region


@pytest.mark.parametrize("cls_loss", ["ce", "focal"])
def test_priors_in_a_crowd_region_get_no_background_loss(monkeypatch: pytest.MonkeyPatch, cls_loss: str) -> None:
    """The SSD family: with one crowd box over the left half and no objects, class gradient only
    on the priors outside it (IoF < 0.5); ``ce`` mines every negative here (ratio 1e6)."""
    model = tiny_model("ssd")
    assert isinstance(model, SsdDetector)
    scale = torch.tensor([W, H, W, H])
    # A prior is judged by its part in the image: edge priors reach past it.
    inside = boxes_in_regions(cxcywh_to_xyxy(model.priors).clamp(0, 1) * scale, CROWD)
    assert 0 < int(inside.sum()) < inside.shape[0]
    cfg = LossConfig(cls_loss=cls_loss, neg_pos_ratio=1e6)
    grads = {}
    for ignore in (None, [CROWD]):
        g = _grads_in_and_out(monkeypatch, model, "forward_raw", lambda out: out[0],
                              lambda g: g.abs().sum(1), cfg, ignore)  # logits (B, C + 1, N) -> (B, N)
        grads[ignore is None] = g[0]
    assert (grads[False][inside] == 0).all() and (grads[False][~inside] > 0).all()
    assert (grads[True][inside] > 0).all()


def test_a_crowd_region_over_the_whole_frame_leaves_no_prior_to_mine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Edge priors reach past the image; judged by their full area, some of them stayed under
    IoF 0.5 of a crowd box covering the whole frame and were still mined as background."""
    model = tiny_model("ssd")
    assert isinstance(model, SsdDetector)
    whole = torch.tensor([[0.0, 0.0, float(W), float(H)]])
    assert not boxes_in_regions(cxcywh_to_xyxy(model.priors) * torch.tensor([W, H, W, H]), whole).all()
    g = _grads_in_and_out(monkeypatch, model, "forward_raw", lambda out: out[0], lambda g: g.abs().sum(1),
                          LossConfig(cls_loss="ce", neg_pos_ratio=1e6), [whole])
    assert (g[0] == 0).all()


def test_the_box_head_samples_no_background_in_a_crowd_region(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two-stage family's box head: with no objects every sampled RoI is background; none of
    them lies in the crowd box (IoF >= 0.5) any more."""
    import build_engine.model.rcnn as rcnn

    model = tiny_model("rcnn")
    assert isinstance(model, RcnnDetector)
    images = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    inner = rcnn.roi_align
    for ignore in (None, [CROWD]):
        rois: list[torch.Tensor] = []

        def recording(
            feature: torch.Tensor, r: torch.Tensor, *args: int, rois: list[torch.Tensor] = rois
        ) -> torch.Tensor:
            rois.append(r)
            return inner(feature, r, *args)

        monkeypatch.setattr(rcnn, "roi_align", recording)
        torch.manual_seed(1)
        loss, parts = model.training_loss(images, [NO_OBJECTS], FAMILIES["rcnn"], ignore=ignore)
        loss.backward()
        assert len(rois) == 1 and rois[0].shape[0] == model.rois_per_image and parts["num_fg"] == 0
        in_crowd = int(boxes_in_regions(rois[0], CROWD).sum())
        if ignore is None:
            assert in_crowd > 0  # trained as background without the region
        else:
            assert in_crowd == 0
