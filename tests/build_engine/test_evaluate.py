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
