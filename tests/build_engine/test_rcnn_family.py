"""The two-stage (R-CNN) family: box coder, losses, RoIAlign, NMS, export parity, training."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from build_engine.export import export_onnx, op_types
from build_engine.losses import LossConfig
from build_engine.model import build_model, preset
from build_engine.model.rcnn import RcnnDetector
from build_engine.model.rcnn_loss import box_head_loss, sample_rois
from build_engine.model.rcnn_ops import BoxCoder, greedy_nms, nms, roi_align, topk_indices
from perception.layouts.base import TensorInfo
from perception.layouts.nms_detections import NmsDetections
from perception.nms import nms as reference_nms

torch.set_num_threads(1)

W, H = 256, 160


def tiny_model(seed: int = 0) -> RcnnDetector:
    torch.manual_seed(seed)
    m = build_model(preset("pico", input_width=W, input_height=H, family="rcnn"))
    assert isinstance(m, RcnnDetector)
    return m


def random_boxes(gen: torch.Generator, n: int, size: float = 100.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * size / 2 + 1.0
    return torch.cat([xy, xy + wh], 1)


def test_box_coder_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    proposals = random_boxes(gen, 50)
    gt = random_boxes(gen, 50)
    coder = BoxCoder()
    deltas = coder.encode(gt, proposals)
    assert torch.allclose(coder.decode(deltas, proposals), gt, atol=1e-3)
    # (10, 10, 5, 5) weights by hand: a box shifted by half its reference width, twice as tall.
    d = coder.encode(torch.tensor([[5.0, -5.0, 15.0, 15.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert torch.allclose(d, torch.tensor([[5.0, 0.0, 0.0, 5 * math.log(2.0)]]), atol=1e-6)


def test_box_head_loss_by_hand() -> None:
    # Two RoIs over C + 1 = 3 classes. RoI 0: uniform logits, label 1 -> CE ln 3. RoI 1:
    # logits (ln 4, 0, 0), label 0 (background) -> p = 4 / 6, CE = ln 1.5. Mean 0.752039.
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(4.0), 0.0, 0.0]])
    rois = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    labels = torch.tensor([1, 0])
    # RoI 0's ground truth: centre (5.5, 5), size 20 x 10 -> target deltas (0.5, 0, 5 ln 2, 0).
    gt = torch.tensor([[-4.5, 0.0, 15.5, 10.0], [0.0, 0.0, 0.0, 0.0]])
    deltas = torch.zeros(2, 2, 4)
    deltas[0, 1] = 7.0  # the other class's deltas: must not be read
    deltas[1] = 9.0  # background: no box loss
    l_cls, l_box, n_fg = box_head_loss(logits, deltas, rois, labels, gt, "smooth_l1", BoxCoder())
    assert n_fg == 1
    assert float(l_cls) == pytest.approx(0.752039, abs=1e-5)
    # smooth-L1 (beta 1) of the differences (-0.5, 0, -3.465736, 0): 0.125 + 2.965736.
    assert float(l_box) == pytest.approx(3.090736, abs=1e-5)
    # An IoU-family loss on the decoded box: zero deltas give the RoI itself, IoU 100 / 200.
    _, l_iou, _ = box_head_loss(logits, deltas, rois, labels, gt, "iou", BoxCoder())
    assert float(l_iou) == pytest.approx(0.5, abs=1e-5)


def test_roi_sampling_labels() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt_cls = torch.tensor([2])
    proposals = torch.tensor([
        [0.0, 0.0, 10.0, 5.0],  # IoU 0.5: foreground
        [0.0, 0.0, 10.0, 4.5],  # IoU 0.45: background
        [20.0, 20.0, 30.0, 30.0],  # IoU 0: background
    ])
    torch.manual_seed(0)
    rois, labels, matched = sample_rois(proposals, gt, gt_cls, 16, 1.0, 0.5)
    got = {tuple(r.tolist()): int(c) for r, c in zip(rois, labels, strict=True)}
    assert got == {(0.0, 0.0, 10.0, 5.0): 3, (0.0, 0.0, 10.0, 4.5): 0, (20.0, 20.0, 30.0, 30.0): 0,
                   (0.0, 0.0, 10.0, 10.0): 3}  # the ground truth itself joins as foreground
    assert torch.equal(matched[labels > 0], gt.expand(2, 4))
    # The foreground quota: a quarter of 4 RoIs is one foreground.
    _, labels, _ = sample_rois(proposals, gt, gt_cls, 4, 0.25, 0.5)
    assert sorted(labels.tolist()) == [0, 0, 3]  # and only two backgrounds exist
    _, labels, _ = sample_rois(proposals, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 8, 0.25, 0.5)
    assert labels.tolist() == [0, 0, 0]


def test_roi_sampling_draws_no_background_from_a_crowd_region() -> None:
    """A crowd box (one box around a group) was trained as background: RoIs on it were sampled
    as background. Now a candidate that is no foreground and lies in one (IoF >= 0.5) is never
    drawn; foreground inside it and background outside are drawn as before."""
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt_cls = torch.tensor([2])
    proposals = torch.tensor([
        [0.0, 0.0, 10.0, 5.0],  # foreground, inside the crowd box
        [20.0, 20.0, 30.0, 30.0],  # background, inside it
        [25.0, 20.0, 35.0, 30.0],  # background, half inside it (IoF 0.5): ignored
        [26.0, 20.0, 36.0, 30.0],  # background, IoF 0.4: drawn
        [50.0, 50.0, 60.0, 60.0],  # background, outside it
    ])
    crowd = torch.tensor([[0.0, 0.0, 30.0, 40.0]])
    torch.manual_seed(0)
    rois, labels, _ = sample_rois(proposals, gt, gt_cls, 16, 0.5, 0.5, crowd)
    got = {tuple(r.tolist()): int(c) for r, c in zip(rois, labels, strict=True)}
    assert got == {(0.0, 0.0, 10.0, 5.0): 3, (0.0, 0.0, 10.0, 10.0): 3, (26.0, 20.0, 36.0, 30.0): 0,
                   (50.0, 50.0, 60.0, 60.0): 0}
    _, labels, _ = sample_rois(proposals, gt, gt_cls, 16, 0.5, 0.5)
    assert (labels == 0).sum() == 4  # without the region all four backgrounds
    # No regions: the same draws as without them (the RNG included).
    torch.manual_seed(1)
    a = sample_rois(proposals, gt, gt_cls, 4, 0.25, 0.5, torch.zeros(0, 4))
    torch.manual_seed(1)
    b = sample_rois(proposals, gt, gt_cls, 4, 0.25, 0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def naive_roi_align(feature: torch.Tensor, rois: torch.Tensor, stride: int, size: int, ratio: int) -> torch.Tensor:
    """Loop RoIAlign: feature coordinate x / stride - 0.5, bilinear with border clamping."""
    _, c, hf, wf = feature.shape
    f = feature[0]

    def sample(x: float, y: float) -> torch.Tensor:
        x = min(max(x, 0.0), wf - 1.0)
        y = min(max(y, 0.0), hf - 1.0)
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        x1, y1 = min(x0 + 1, wf - 1), min(y0 + 1, hf - 1)
        ax, ay = x - x0, y - y0
        return ((1 - ax) * (1 - ay) * f[:, y0, x0] + ax * (1 - ay) * f[:, y0, x1]
                + (1 - ax) * ay * f[:, y1, x0] + ax * ay * f[:, y1, x1])

    out = torch.zeros(rois.shape[0], c, size, size)
    for r, (x1_, y1_, x2_, y2_) in enumerate(rois.tolist()):
        bw, bh = (x2_ - x1_) / size, (y2_ - y1_) / size
        for i in range(size):
            for j in range(size):
                acc = torch.zeros(c)
                for si in range(ratio):
                    for sj in range(ratio):
                        y = y1_ + (i + (si + 0.5) / ratio) * bh
                        x = x1_ + (j + (sj + 0.5) / ratio) * bw
                        acc += sample(x / stride - 0.5, y / stride - 0.5)
                out[r, :, i, j] = acc / ratio**2
    return out


def test_roi_align_plane_and_naive_loop() -> None:
    stride, size = 8, 7
    hf, wf = 20, 32
    ys, xs = torch.meshgrid(torch.arange(hf, dtype=torch.float32), torch.arange(wf, dtype=torch.float32),
                            indexing="ij")
    a, b, c = 0.7, -1.3, 2.0
    plane = (a * xs + b * ys + c)[None, None]
    rois = torch.tensor([[12.0, 10.0, 100.0, 60.0], [40.5, 33.3, 57.0, 41.0], [8.0, 8.0, 240.0, 150.0]])
    got = roi_align(plane, rois, stride, size, 2)
    # Bilinear sampling is exact on a plane, so each bin's average is the plane at the bin's
    # centre, feature coordinate (input px / stride - 0.5).
    k = torch.arange(size, dtype=torch.float32) + 0.5
    cx = rois[:, 0:1] + k * (rois[:, 2:3] - rois[:, 0:1]) / size
    cy = rois[:, 1:2] + k * (rois[:, 3:4] - rois[:, 1:2]) / size
    expect = a * (cx[:, None, :] / stride - 0.5) + b * (cy[:, :, None] / stride - 0.5) + c
    assert torch.allclose(got[:, 0], expect, atol=1e-4)
    gen = torch.Generator().manual_seed(0)
    feature = torch.randn(1, 3, hf, wf, generator=gen)
    rois = torch.cat([random_boxes(gen, 4, 200.0), torch.tensor([[-10.0, -6.0, 30.0, 20.0]])])  # one off-map
    assert torch.allclose(roi_align(feature, rois, stride, 3, 2), naive_roi_align(feature, rois, stride, 3, 2),
                          atol=1e-5)


class _NmsModule(torch.nn.Module):
    def __init__(self, iou: float, score: float, max_out: int) -> None:
        super().__init__()
        self.iou, self.score, self.max_out = iou, score, max_out

    def forward(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return nms(boxes, scores, self.iou, self.score, self.max_out)


def nms_case(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    boxes = random_boxes(gen, 300)
    boxes[:5, 2:] = boxes[:5, :2]  # zero-area boxes never suppress nor get suppressed
    scores = torch.round(torch.rand(300, generator=gen) * 20) / 20  # many ties
    return boxes, scores


def test_nms_matches_reference_and_onnx(tmp_path: Path) -> None:
    for seed in range(3):
        boxes, scores = nms_case(seed)
        for iou in (0.3, 0.5, 0.7):
            got = greedy_nms(boxes, scores, iou, -1.0, 10_000)
            assert got.tolist() == reference_nms(boxes.numpy(), scores.numpy(), iou).tolist()
    boxes, scores = nms_case(3)
    path = tmp_path / "nms.onnx"
    for score_floor, max_out in ((-1.0, 10_000), (0.5, 40)):
        mod = _NmsModule(0.5, score_floor, max_out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's notices, as in export_onnx
            torch.onnx.export(mod, (boxes, scores), str(path), dynamo=False, opset_version=17,
                              input_names=["boxes", "scores"], output_names=["keep"],
                              dynamic_axes={"boxes": {0: "n"}, "scores": {0: "n"}})
        assert "NonMaxSuppression" in op_types(path)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for seed in (3, 4):
            boxes, scores = nms_case(seed)
            onnx_keep = sess.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy()})[0]
            eager = mod(boxes, scores)
            assert onnx_keep.tolist() == eager.tolist()
            assert bool((scores[eager] > score_floor).all()) and eager.numel() <= max_out


class _TopK(torch.nn.Module):
    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return topk_indices(scores, 30)


def test_topk_ties_match_onnx(tmp_path: Path) -> None:
    """Saturated scores tie; eager and ONNX Runtime must still pick the same proposals."""
    scores = torch.zeros(50)
    scores[5:40] = 1.0
    path = tmp_path / "topk.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_TopK(), (scores,), str(path), dynamo=False, opset_version=17, input_names=["s"])
    onnx_top = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"s": scores.numpy()})[0]
    assert onnx_top.tolist() == _TopK()(scores).tolist() == list(range(5, 35))


def calibrated_model() -> RcnnDetector:
    """A random-init model whose BN statistics come from one batch (so features, and with them
    proposal scores, differ from place to place: untrained running statistics shrink every map
    to nearly a constant), with thresholds lowered so it outputs detections."""
    m = tiny_model(1)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = 1.0
    m.train()
    with torch.no_grad():
        m.features(torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1)))
    torch.nn.init.normal_(m.box_head.cls_score.weight, std=0.05)
    torch.nn.init.normal_(m.box_head.bbox_pred.weight, std=0.05)
    m.eval()
    m.score_floor = 0.0
    m.proposal_min_score = 0.0
    return m


def test_export_parity_and_layout(tmp_path: Path) -> None:
    m = calibrated_model()
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        both = m(x)
        singles = [m(x[i:i + 1]) for i in range(2)]
    # A batch pads to its largest count; each image's rows equal its own single-image run.
    for i, single in enumerate(singles):
        n = int(single[0])
        assert int(both[0][i, 0]) == n > 0
        for a, b in zip(both[1:], single[1:], strict=True):
            assert torch.allclose(a[i, :n], b[0, :n], atol=1e-5)
    path = export_onnx(m, tmp_path / "rcnn.onnx", (H, W))
    ops = set(op_types(path))
    assert {"NonMaxSuppression", "MatMul", "TopK"} <= ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    infos = [TensorInfo(o.name, tuple(d if isinstance(d, int) else None for d in o.shape),
                        "int64" if o.type == "tensor(int64)" else "float32") for o in sess.get_outputs()]
    roles = NmsDetections().bind(infos, {}, 7)
    assert roles == {"boxes": "det_boxes", "num_dets": "num_dets", "scores": "det_scores", "classes": "det_classes"}
    for i, single in enumerate(singles):
        num, boxes, scores, classes = sess.run(list(m.output_names), {"images": x[i:i + 1].numpy()})
        assert num.dtype == classes.dtype == np.int64 and num.shape == (1, 1)
        assert int(num[0, 0]) == int(single[0]) == boxes.shape[1]
        assert np.array_equal(classes, single[3].numpy())
        assert np.allclose(scores, single[2].numpy(), atol=1e-4)
        assert np.allclose(boxes, single[1].numpy(), atol=1e-2)  # input px after exp() of deltas


def test_no_proposals_no_detections(tmp_path: Path) -> None:
    """An empty scene: zero proposals flow through RoIAlign and the head as empty tensors, in
    eager PyTorch and in ONNX Runtime."""
    m = calibrated_model()
    m.proposal_min_score = 1.0  # a probability never exceeds it
    x = torch.rand(2, 3, H, W)
    with torch.no_grad():
        out = m(x)
    assert out[0].tolist() == [[0], [0]] and tuple(out[1].shape) == (2, 0, 4)
    sess = ort.InferenceSession(str(export_onnx(m, tmp_path / "empty.onnx", (H, W))),
                                providers=["CPUExecutionProvider"])
    num, boxes, scores, classes = sess.run(list(m.output_names), {"images": x[:1].numpy()})
    assert num.tolist() == [[0]] and boxes.shape == (1, 0, 4) and scores.shape == classes.shape == (1, 0)


def test_training_steps_reduce_the_loss() -> None:
    m = tiny_model(0)
    m.rois_per_image = 32
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, H, W, generator=gen) * 0.2
    targets = []
    for k, (x1, y1, x2, y2, cls) in enumerate([(40, 30, 100, 90, 0), (150, 60, 220, 140, 3)]):
        images[k, :, y1:y2, x1:x2] = torch.tensor([0.9, 0.2, 0.1])[:, None, None] * (cls + 1) / 4
        targets.append((torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), torch.tensor([cls])))
    cfg = LossConfig(box_loss="giou")
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    m.train()
    losses: list[float] = []
    parts: list[dict[str, float]] = []
    for _ in range(8):
        loss, p = m.training_loss(images, targets, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        parts.append(p)
    assert set(parts[0]) == {"rpn", "rpn_box", "rpn_obj", "cls", "box", "num_fg"} and parts[0]["num_fg"] > 0
    assert losses[-1] < 0.8 * losses[0]
    assert parts[-1]["rpn"] < parts[0]["rpn"] and parts[-1]["cls"] < parts[0]["cls"]  # both stages learn


def test_the_export_check_holds_a_two_stage_export_to_its_checkpoints_detections(tmp_path: Path) -> None:
    """check_export returned at once for the post-NMS layout: the export of another two-stage
    model passed for the shipped checkpoint, so a broken fold or export moved the reference of
    every gate unseen. Its detections on generated scenes are compared now."""
    from build_engine.build import check_export, export_variant_onnx, load_model
    from perception.errors import ModelError
    from tests.conftest import REPO_ROOT

    lm = load_model(REPO_ROOT / "models" / "rcnn" / "detector.pt")
    own, _ = export_variant_onnx(lm, tmp_path / "own.onnx")
    check_export(lm, own)
    torch.manual_seed(0)
    other = build_model(preset("edge", family="rcnn")).eval()
    unrelated = export_onnx(other, str(tmp_path / "other.onnx"), (lm.input_height, lm.input_width))
    with pytest.raises(ModelError, match="the BN folding or the export changed the model"):
        check_export(lm, Path(unrelated))
