"""Evaluation: a checkpoint and its ONNX export score the same through the serving code;
``perception eval`` on COCO files, with JSON and PNG output."""

from __future__ import annotations

import json

import pytest
import torch

from build_engine.checkpoint import meta_for, save_checkpoint
from build_engine.data.generate import generate_dataset
from build_engine.evaluate import evaluate_checkpoint, evaluate_onnx, write_report
from build_engine.model import build_detector, preset
from build_engine.model.detector import HeadLevel
from perception.errors import ModelError


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ev")
    data = generate_dataset(d / "data", 6, seed=9, width=160, height=96)
    torch.manual_seed(0)
    m = build_detector(preset("pico", input_width=128, input_height=96)).eval()
    with torch.no_grad():  # scores around 0.25 so there are plenty of (random) detections
        for h in m.heads:
            assert isinstance(h, HeadLevel)
            assert h.obj_pred.bias is not None and h.cls_pred.bias is not None
            h.obj_pred.bias.zero_()
            h.cls_pred.bias.zero_()
    ckpt = save_checkpoint(d / "m.pt", m, meta_for(m))
    onnx_path = d / "m.onnx"
    torch.onnx.export(m, (torch.rand(1, 3, 96, 128),), str(onnx_path), opset_version=17, input_names=["images"],
                      output_names=["output"], dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}},
                      dynamo=False)
    return ckpt, onnx_path, data


def test_checkpoint_and_onnx_score_the_same(model_and_data, tmp_path) -> None:
    ckpt, onnx_path, data = model_and_data
    r1, p1, gt = evaluate_checkpoint(ckpt, data)
    r2, p2, _ = evaluate_onnx(onnx_path, data)
    assert len(p1) > 50 and len(p1) == len(p2)
    assert r1.map50_95 == pytest.approx(r2.map50_95, abs=1e-4) and r1.precision == pytest.approx(r2.precision, abs=1e-3)
    assert {p["image_id"] for p in p1} <= {im["id"] for im in gt["images"]}
    out = write_report(tmp_path / "rep", r1, p1)
    for f in ("kpi.json", "results.json", "pr_curve.png", "f1_confidence.png", "confusion_matrix.png"):
        assert (out / f).stat().st_size > 0
    assert json.loads((out / "kpi.json").read_text())["map50_95"] == r1.map50_95


def test_bad_model_files(tmp_path, model_and_data) -> None:
    _, _, data = model_and_data
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    with pytest.raises(ModelError, match="bad.onnx"):
        evaluate_onnx(bad, data)
    with pytest.raises(ModelError, match="missing.pt"):
        evaluate_checkpoint(tmp_path / "missing.pt", data)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """The real CLI entry point in-process (same dispatch and error handling as the script)."""
    from perception.cli import main

    capsys.readouterr()
    code = main(["eval", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_cli_gt_pred_json_and_errors(model_and_data, tmp_path, capsys) -> None:
    ckpt, _, data = model_and_data
    gt = json.loads((data / "annotations.json").read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    (tmp_path / "p.json").write_text(json.dumps(perfect))
    code, out, err = run_cli(capsys, "--gt", str(data / "annotations.json"), "--pred", str(tmp_path / "p.json"),
                             "--json", "--out", str(tmp_path / "o"))
    assert code == 0, err
    d = json.loads(out)
    assert d["map50_95"] == pytest.approx(1.0) and d["map50"] == pytest.approx(1.0)
    assert d["precision"] == 1.0 and d["recall"] == 1.0
    assert (tmp_path / "o" / "pr_curve.png").is_file()
    code, out, _ = run_cli(capsys, "--checkpoint", str(ckpt), "--data", str(data))
    assert code == 0 and "mAP50-95" in out and "car" in out
    (tmp_path / "bad.json").write_text('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 1}]')
    code, _, err = run_cli(capsys, "--gt", str(data / "annotations.json"), "--pred", str(tmp_path / "bad.json"))
    assert code == 1 and "bad.json: [0]" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _crowd_coco_set(root):
    """One 128x96 image; categories with ids 3, 7, 11 (not 1..C); a car, a bus, and a crowd
    region of people whose 'area' (its segment's) is smaller than its box."""
    import cv2
    import numpy as np

    (root / "images").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "a.png"), np.full((96, 128, 3), 90, np.uint8))
    gt = {
        "images": [{"id": 5, "file_name": "a.png", "width": 128, "height": 96}],
        "categories": [{"id": 3, "name": "car"}, {"id": 7, "name": "bus"}, {"id": 11, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 3, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 7, "bbox": [60, 20, 40, 50], "area": 2000, "iscrowd": 0},
            {"id": 3, "image_id": 5, "category_id": 11, "bbox": [5, 50, 45, 40], "area": 900, "iscrowd": 1},
        ],
    }
    (root / "annotations.json").write_text(json.dumps(gt))
    return root


def test_eval_keeps_crowd_regions_areas_and_the_datasets_category_ids(tmp_path) -> None:
    """The build-stage reader dropped iscrowd and area and renumbered category ids to 1..C:
    a crowd region the model (rightly) does not detect counted as a miss, results.json named
    categories the dataset does not have, and ``eval --checkpoint --data`` disagreed with
    ``eval --gt --pred`` on the same detections. Now both score the same."""
    import numpy as np

    from build_engine.data.formats import read_labelled_set
    from build_engine.evaluate import evaluate_runner
    from perception.coco import load_coco
    from perception.kpi import evaluate_coco

    data = _crowd_coco_set(tmp_path / "d")
    ds = read_labelled_set(data)
    assert ds.classes == ("car", "bus", "person") and ds.coco_category_ids() == (3, 7, 11)
    s = ds.samples[0]
    assert s.crowd_mask().tolist() == [False, False, True] and s.areas is not None and s.areas[2] == 900

    def runner(batch):  # sees the car and the bus exactly (the input is the image: no letterbox)
        out = np.zeros((len(batch), 2, 8), np.float32)
        out[:, 0, :6] = [10, 10, 40, 30, 0.9, 0.9]
        out[:, 1, :5] = [60, 20, 100, 70, 0.9]
        out[:, 1, 6] = 0.9
        return {"output": out}

    report, preds, gt = evaluate_runner(runner, ds, (128, 96))
    assert sorted(p["category_id"] for p in preds) == [3, 7]
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0, 1] and gt["annotations"][2]["area"] == 900
    assert report.recall == pytest.approx(1.0) and report.precision == pytest.approx(1.0)
    file_report = evaluate_coco(load_coco(data / "annotations.json"), preds)  # what eval --gt --pred says
    assert report.map50_95 == pytest.approx(file_report.map50_95) and report.recall == file_report.recall
