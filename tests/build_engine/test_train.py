"""Training: config loading / overrides / errors, a tiny real run, determinism and resume."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from build_engine.config import load_config
from build_engine.train.schedule import learning_rates
from build_engine.train.trainer import train
from perception.errors import ConfigError, DataError


def tiny_overrides(cache) -> list[str]:
    return [
        "preset=pico", "model.input_width=128", "model.input_height=96", "threads=1",
        f"data.cache_dir={cache}", "data.train_images=8", "data.val_images=4",
        "data.image_width=160", "data.image_height=96", "optim.epochs=2", "optim.batch_size=4",
        "optim.warmup_epochs=0.5",
    ]


def test_config_file_overrides_and_errors(tmp_path, repo_root) -> None:
    cfg = load_config(repo_root / "configs" / "default.yaml",
                      ["optim.lr=0.005", "loss.box_loss=giou", "augment.flip=0"])
    assert cfg.optim.lr == 0.005 and cfg.loss.box_loss == "giou" and cfg.augment.flip == 0
    assert cfg.model.act == "relu" and cfg.model.num_classes == 7
    with pytest.raises(ConfigError, match=r"default.yaml: unknown config key 'optim.learning_rate'"):
        load_config(repo_root / "configs" / "default.yaml", ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_config(None, ["bogus=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  optimizer: adam\n")
    with pytest.raises(ConfigError, match="bad.yaml.*optimizer"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["optim.lr"])


def test_schedule_warmup_then_cosine() -> None:
    rates = functools.partial(learning_rates, steps_per_epoch=10, epochs=10, base_lr=0.1, schedule="cosine",
                              final_ratio=0.1, warmup_epochs=1, warmup_bias_lr=0.5)
    w0, b0 = rates(0)
    assert w0 == 0.0 and b0 == 0.5
    w, b = rates(50)
    assert w == b == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))  # half way: cos = 0
    assert rates(100)[0] == pytest.approx(0.01)


def test_tiny_training_run_is_deterministic_and_resumable(tmp_path) -> None:
    cfg = load_config(None, tiny_overrides(tmp_path / "cache"))
    a = train(cfg, tmp_path / "a", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert all("loss_box" in x and "loss_obj" in x and "loss_cls" in x and "map50_95" in x["val"] for x in lines)
    assert a.best_checkpoint.is_file()
    torch.load(a.best_checkpoint, weights_only=True)
    torch.load(a.last_checkpoint, weights_only=True)  # the resume state is weights-only too
    # Interrupted after one epoch, then resumed: identical weights and log.
    train(cfg, tmp_path / "b", progress=False, stop_after=1)
    train(cfg, tmp_path / "b", progress=False, resume=True)
    sa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    lb = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [x["loss_total"] for x in lb] == [x["loss_total"] for x in lines]
    # Fine-tuning starts from given weights: with a vanishing lr, the weights stay those weights.
    init = a.best_checkpoint
    ft = load_config(None, tiny_overrides(tmp_path / "cache") + [f"init_checkpoint={init}", "optim.epochs=1",
                                                                  "optim.lr=1e-12", "optim.warmup_bias_lr=0",
                                                                  "optim.weight_decay=0"])
    train(ft, tmp_path / "ft", progress=False)
    w0 = torch.load(init, weights_only=True)["state_dict"]
    w1 = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)["state_dict"]
    conv = [k for k in w0 if k.endswith("conv.weight")]
    assert conv and all(torch.allclose(w0[k], w1[k], atol=1e-6) for k in conv)
    # Resuming with a different config is refused.
    other = load_config(None, tiny_overrides(tmp_path / "cache") + ["optim.lr=0.001"])
    with pytest.raises(ConfigError, match="different config"):
        train(other, tmp_path / "b", progress=False, resume=True)


def test_train_cli_unknown_key_is_one_line_error(tmp_path, capsys) -> None:
    from perception.cli import main

    assert main(["train", "--out", str(tmp_path / "o"), "--set", "optim.nope=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("perception train: error:") and "optim.nope" in err and len(err.splitlines()) == 1


def test_augmentation_moves_boxes_with_pixels() -> None:
    import numpy as np

    from build_engine.config import AugmentConfig
    from build_engine.train.augment import random_affine

    img = np.zeros((90, 160, 3), np.uint8)
    img[20:50, 30:70] = 255  # the object: x 30..70, y 20..50
    boxes = np.array([[30, 20, 70, 50]], np.float32)
    cfg = AugmentConfig(flip=0.5, scale_min=0.6, scale_max=1.5, translate=0.2)
    for seed in range(6):
        out, nb, keep = random_affine(img, boxes, 128, 96, cfg, np.random.default_rng(seed))
        ys, xs = np.nonzero(out[..., 0] > 128)
        if keep[0]:
            assert abs(xs.min() - nb[0, 0]) <= 1.5 and abs(xs.max() + 1 - nb[0, 2]) <= 1.5
            assert abs(ys.min() - nb[0, 1]) <= 1.5 and abs(ys.max() + 1 - nb[0, 3]) <= 1.5
    plain, pb, _ = random_affine(img, boxes, 128, 96, cfg, None)  # letterbox only, like serving
    # scale min(128/160, 96/90) = 0.8 -> 128x72 content, (96 - 72) / 2 = 12 px pad on top
    np.testing.assert_allclose(pb[0], [30 * 0.8, 20 * 0.8 + 12, 70 * 0.8, 50 * 0.8 + 12], atol=1e-4)


@pytest.mark.parametrize("family", ["ssd", "rcnn"])
def test_each_family_trains_from_its_config_and_exports_its_layout(tmp_path, repo_root, family) -> None:
    """`perception train --config configs/<family>.yaml` at a tiny size: a checkpoint that loads
    as its family and exports an artifact whose manifest names the family's output layout."""
    from build_engine.build import export_fp32_artifact
    from build_engine.checkpoint import load_checkpoint
    from perception.manifest import load_manifest

    cfg = load_config(repo_root / "configs" / f"{family}.yaml",
                      [o for o in tiny_overrides(tmp_path / "cache") if not o.startswith("preset")]
                      + ["model.width_mult=0.125", "optim.epochs=1"])
    assert cfg.model.family == family
    result = train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "train_curves.png").stat().st_size > 1000  # loss and mAP curves beside the log
    model, meta = load_checkpoint(result.best_checkpoint)
    assert meta.config.family == family
    assert type(model).__name__ == {"ssd": "SsdDetector", "rcnn": "RcnnDetector"}[family]
    assert meta.train_config_hash == cfg.hash()
    m = load_manifest(export_fp32_artifact(result.best_checkpoint, tmp_path / "artifact"))
    assert m.postprocess.output_layout == {"ssd": "ssd", "rcnn": "nms_detections"}[family]
    assert m.variant().max_batch == (1 if family == "rcnn" else 8)


def _object_on_pad(h: int, w: int, box: tuple[int, int, int, int]):
    """An image of the pad colour with one white object at ``box`` (x1 y1 x2 y2) whose left half
    is also marked in the red channel (to tell a flipped placement)."""
    import numpy as np

    from build_engine.train.augment import PAD_VALUE

    img = np.full((h, w, 3), PAD_VALUE, np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2, :2] = 255
    img[y1:y2, x1:(x1 + x2) // 2, 2] = 255
    return img


def _centroid(canvas, channel: int) -> tuple[float, float, float]:
    """(x, y, mass) of a channel's excess over the pad colour, in edge coordinates (pixel i's centre is i + 0.5)."""
    import numpy as np

    from build_engine.train.augment import PAD_VALUE

    wgt = (canvas[..., channel].astype(np.float64) - PAD_VALUE) / (255 - PAD_VALUE)
    ys, xs = np.mgrid[: canvas.shape[0], : canvas.shape[1]] + 0.5
    mass = float(wgt.sum())
    return float((wgt * xs).sum() / mass), float((wgt * ys).sum() / mass), mass


@pytest.mark.parametrize("size", [(160, 90), (640, 360)])  # the second downscales by 5x, through INTER_AREA
def test_augmented_pixels_sit_under_their_boxes_to_a_third_of_a_pixel(size) -> None:
    """warpAffine maps pixel centres, boxes map edges: without the 0.5 * (1 - scale) term a
    flipped object sat ~1 px left of its box (and ~0.2 px off at other scales). The object's
    intensity centroid and extent must match its box within 0.3 px, flipped or not."""
    import numpy as np

    from build_engine.config import AugmentConfig
    from build_engine.train.augment import random_affine

    w, h = size
    k = w // 160
    box = (30 * k, 20 * k, 70 * k, 50 * k)
    img = _object_on_pad(h, w, box)
    boxes = np.array([box], np.float32)
    cfg = AugmentConfig(flip=0.5, scale_min=0.6, scale_max=1.5, translate=0.2)
    flips = set()
    for seed in range(16):
        out, nb, keep = random_affine(img, boxes, 128, 96, cfg, np.random.default_rng(seed))
        x1, y1, x2, y2 = nb[0].tolist()
        if not keep[0] or x1 < 1 or y1 < 1 or x2 > 127 or y2 > 95:
            continue  # clipped by the canvas: its pixels are not all there
        cx, cy, mass = _centroid(out, 0)
        assert abs(cx - (x1 + x2) / 2) <= 0.3 and abs(cy - (y1 + y2) / 2) <= 0.3, (seed, cx, cy, nb[0])
        assert mass == pytest.approx((x2 - x1) * (y2 - y1), rel=0.03)
        flips.add(_centroid(out, 2)[0] > cx)  # the marked half ends up on the right when flipped
    assert flips == {False, True}


def test_large_downscale_is_area_averaged_like_serving() -> None:
    """warpAffine ignores INTER_AREA (it samples bilinearly), so a 1080p frame scaled to 512
    wide aliased in training while serving's letterbox area-averages it: on noise the pixel
    spread was 2.8x serving's. Training's placement now matches serving's pixels."""
    import cv2
    import numpy as np

    from build_engine.config import AugmentConfig
    from build_engine.train.augment import random_affine
    from perception.letterbox import letterbox_image

    img = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    served, _ = letterbox_image(img, 512, 288)
    ours, _, _ = random_affine(img, np.zeros((0, 4), np.float32), 512, 288, AugmentConfig(), None)
    s = 512 / 1920
    linear = cv2.warpAffine(img, np.array([[s, 0, 0], [0, s, 0]], np.float32), (512, 288), flags=cv2.INTER_LINEAR)
    assert linear.std() > 2 * served.std()  # what plain warping gives
    assert ours.std() == pytest.approx(served.std(), rel=0.05)
    assert np.abs(ours.astype(int) - served.astype(int)).mean() < 1.0


def test_two_stage_resume_repeats_an_uninterrupted_run(tmp_path, repo_root) -> None:
    """The two-stage family samples RoIs with the global torch RNG. last.pt did not keep its
    state, so a resumed run restarted it from manual_seed(seed) and drew other RoIs than an
    uninterrupted run: other weights. The state is now saved and restored."""
    cfg = load_config(repo_root / "configs" / "rcnn.yaml",
                      [o for o in tiny_overrides(tmp_path / "cache") if not o.startswith("preset")]
                      + ["model.width_mult=0.125", "optim.ema=false"])
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False, stop_after=1)
    saved = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["train_state"]["torch_rng"]
    assert isinstance(saved, torch.Tensor) and saved.dtype == torch.uint8
    train(cfg, tmp_path / "b", progress=False, resume=True)
    sa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _write_yolo_set(root, classes: tuple[str, ...], n_images: int = 2) -> None:
    import cv2
    import numpy as np

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for i in range(n_images):
        cv2.imwrite(str(root / "images" / f"{i:03d}.png"), np.full((48, 64, 3), 90, np.uint8))
        (root / "labels" / f"{i:03d}.txt").write_text(f"{i % len(classes)} 0.5 0.5 0.25 0.25\n")


def test_class_count_and_order_must_fit_the_model(tmp_path) -> None:
    """A 3-class set with the default 7-class model trained a whole epoch, then failed in
    validation ("expected (B, N, 8)"); more than 7 classes crashed the first batch in one_hot;
    a val set with its classes in another order was scored under the wrong mapping. All are
    now refused before the model is built, saying what to pass."""
    three = ("car", "bus", "person")
    _write_yolo_set(tmp_path / "train", three)
    _write_yolo_set(tmp_path / "val", three)
    _write_yolo_set(tmp_path / "val_reordered", ("bus", "car", "person"))
    base = tiny_overrides(tmp_path / "cache") + [f"data.train_dir={tmp_path / 'train'}"]
    cfg = load_config(None, base + [f"data.val_dir={tmp_path / 'val'}"])
    with pytest.raises(ConfigError, match=r"3 classes .*model.num_classes is 7: pass --set model.num_classes=3"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()
    cfg = load_config(None, base + [f"data.val_dir={tmp_path / 'val_reordered'}", "model.num_classes=3"])
    with pytest.raises(ConfigError, match=r"val_reordered: val classes \['bus', 'car', 'person'\] are not"):
        train(cfg, tmp_path / "run", progress=False)
    # With the count given and the same classes on both sides, it trains (one step, one epoch).
    cfg = load_config(None, base + [f"data.val_dir={tmp_path / 'val'}", "model.num_classes=3", "optim.epochs=1",
                                    "optim.batch_size=2"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.epochs_run == 1
    # Fine-tuning that model (perception prune --finetune-epochs) with the default 7-class config:
    # the loss was sized by the config, and the first batch failed after pruning and data loading.
    from build_engine.prune import finetune
    from build_engine.pruned_checkpoint import load_any_checkpoint

    model, meta = load_any_checkpoint(result.last_checkpoint)
    cfg7 = load_config(None, base + [f"data.val_dir={tmp_path / 'val'}", "optim.batch_size=2"])
    assert "map50_95" in finetune(model, cfg7, 1, 0.01, progress=False, classes=meta.classes)
    # A val set without one labelled object scored "no data" every epoch: training ran to the end
    # and wrote no best.pt, whose path it printed.
    _write_yolo_set(tmp_path / "val_unlabelled", three)
    for f in (tmp_path / "val_unlabelled" / "labels").iterdir():
        f.write_text("")
    cfg = load_config(None, base + [f"data.val_dir={tmp_path / 'val_unlabelled'}", "model.num_classes=3"])
    with pytest.raises(DataError, match="val set has no labelled object"):
        train(cfg, tmp_path / "run_unlabelled", progress=False)


def test_crowd_regions_are_no_training_targets(tmp_path) -> None:
    """A COCO crowd region (one box around a group) became an ordinary positive target; then it
    was dropped, and its pixels trained as background. It is an ignore region now."""
    from build_engine.data.formats import read_labelled_set
    from build_engine.train.trainer import load_batch, load_train_batch
    from tests.build_engine.test_evaluate import _crowd_coco_set

    ds = read_labelled_set(_crowd_coco_set(tmp_path / "d"))
    cfg = load_config(None, ["model.input_width=128", "model.input_height=96"])
    _, targets, ignore = load_train_batch(ds, [0], cfg, epoch=0, augment=False)
    boxes, classes = targets[0]
    assert classes.tolist() == [0, 1]  # car and bus; not the crowd of people (class 2)
    assert boxes.tolist() == [[10, 10, 40, 30], [60, 20, 100, 70]]
    assert ignore[0].tolist() == [[5, 50, 50, 90]] and ignore[0].dtype == torch.float32
    images, plain = load_batch(ds, [0], cfg, epoch=0, augment=False)  # the same, without the regions
    assert torch.equal(images, load_train_batch(ds, [0], cfg, epoch=0, augment=False).images)
    assert all(torch.equal(a, b) for a, b in zip(plain[0], targets[0], strict=True))


def test_crowd_regions_move_with_the_image_like_targets(tmp_path) -> None:
    """Augmentation (scale, shift, flip) moves an ignore region exactly as a target with the same
    box, and keeps it while any of it is visible; the targets are those without crowd regions."""
    import cv2
    import numpy as np

    from build_engine.data.formats import read_labelled_set
    from build_engine.train.trainer import load_train_batch

    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.full((120, 160, 3), 90, np.uint8))
    ann = [([30, 40, 50, 40], 0), ([30, 40, 50, 40], 1), ([100, 10, 40, 30], 0), ([77, 57, 6, 6], 1)]
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 160, "height": 120}],
          "categories": [{"id": 1, "name": "person"}],
          "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": b[2] * b[3],
                           "iscrowd": c} for k, (b, c) in enumerate(ann)]}
    (tmp_path / "annotations.json").write_text(json.dumps(gt))
    ds = read_labelled_set(tmp_path)
    cfg = load_config(None, ["model.input_width=128", "model.input_height=96", "augment.flip=0.5",
                             "augment.min_box_px=8"])
    flipped = 0
    for epoch in range(8):
        _, targets, ignore = load_train_batch(ds, [0], cfg, epoch=epoch)
        boxes = targets[0][0]
        # Target 0 and crowd region 0 share a box: both land on the same canvas pixels.
        assert len(boxes) == 2 and torch.equal(ignore[0][0], boxes[0])
        # The small crowd box (3-7 px on the canvas) would be no target (min_box_px 8), yet it stays.
        assert ignore[0].shape == (2, 4)
        flipped += int(boxes[1, 0] < boxes[0, 0])  # the right-hand box is on the left once flipped
    assert 0 < flipped < 8


def test_far_object_fine_tune_is_published_with_its_provenance(tmp_path) -> None:
    # scripts/train_default.sh's optional last stage: a run trained from scratch, fine-tuned on
    # far objects (data.min_object_px) from its best checkpoint, scored and published. The
    # report says what the fine-tune changed, scores the far test scenes too, and keeps both
    # epoch tables; so does a fine-tune of a published model, published in place (twice, as
    # the script does).
    import yaml

    from build_engine.data.generate import generate_dataset
    from build_engine.train.export_default import export
    from perception.cli import main

    def evaluate(checkpoint, run, far_too: bool = False) -> None:
        for data, out in ((test, "eval"), (far_test, "eval_far"))[:2 if far_too else 1]:
            assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(run / out),
                         "--no-progress"]) == 0

    def fine_tune(init, out) -> None:
        cfg = load_config(None, tiny_overrides(tmp_path / "cache") + [
            f"init_checkpoint={init}", "data.min_object_px=6", "optim.epochs=1", "optim.lr=0.005"])
        train(cfg, out, progress=False)

    test = generate_dataset(tmp_path / "test", 3, seed=3, width=160, height=96)
    far_test = generate_dataset(tmp_path / "test_far", 3, seed=3, width=160, height=96, min_object_px=6)
    base = tmp_path / "run"
    train(load_config(None, tiny_overrides(tmp_path / "cache") + ["optim.epochs=1"]), base, progress=False)
    far = base / "far"
    fine_tune(base / "best.pt", far)
    assert (tmp_path / "cache" / "train-s1-n8-160x96-far6l2" / ".complete").is_file()
    evaluate(far / "best.pt", far, far_too=True)
    pub = export(far, tmp_path / "default")
    report = (pub / "eval.md").read_text()
    provenance = next(line for line in report.splitlines() if line.startswith("Checkpoint"))
    assert f"`{base / 'best.pt'}` fine-tuned on configs/default.yaml with " in provenance
    assert "`data.min_object_px=6`" in provenance and "`optim.epochs=1`" in provenance
    assert "init_checkpoint" not in provenance
    assert "objects out to 6 px tall" in report
    assert report.count("Training (configs/default.yaml") == 1
    assert report.count("Fine-tune (configs/default.yaml") == 1
    card = yaml.safe_load((pub / "config.yaml").read_text())
    assert card["fine_tuned_from"] == str(base / "best.pt") and card["min_object_px"] == 6
    assert card["fine_tuned_from_epoch"] == 1 and card["fine_tuned_from_config_hash"]

    # In place: the published model fine-tuned again and published over itself, twice.
    again = tmp_path / "again"
    fine_tune(pub / "detector.pt", again)
    evaluate(again / "best.pt", again)
    for _ in range(2):
        export(again, pub)
        report = (pub / "eval.md").read_text()
        assert report.count("Training (configs/default.yaml") == 1, report  # the first training's table, kept
        assert report.count("| 1 |") == 2  # its one epoch, and the fine-tune's
