"""The design table's machinery on tiny real models: export, quantize, score, time, Pareto, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from build_engine import design, profile
from perception.errors import ConfigError, ModelError


def _row(key: str, ms: float, m: float) -> design.DesignRow:
    return design.DesignRow(key, "yolo", key, "shipped", "relu", 0.5, 0.33, 512, 288, 1, 1,
                            fp32_ms={"min": ms, "p50": ms}, int8_ms={"min": ms, "p50": ms},
                            fp32={"map50_95": m, "map50": m}, int8={"map50_95": m, "map50": m})


def test_pareto_front_keeps_only_undominated_rows() -> None:
    rows = [_row("fast-poor", 1.0, 0.2), _row("slow-good", 3.0, 0.6), _row("dominated", 3.5, 0.5),
            _row("middle", 2.0, 0.4), _row("tie-slower", 2.0, 0.3)]
    design.mark_pareto(rows)
    assert {r.key for r in rows if r.pareto} == {"fast-poor", "slow-good", "middle"}


def test_rows_are_selected_by_key_and_unknown_keys_are_named() -> None:
    assert [s.key for s in design.select(["ssd-edge", "rcnn"])] == ["ssd-edge", "rcnn"]
    assert len(design.select([])) >= 12
    with pytest.raises(ConfigError, match="no-such-row"):
        design.select(["no-such-row"])
    families = {s.family for s in design.SPECS}
    assert families == {"yolo", "ssd", "rcnn"}
    assert {s.overrides[0] for s in design.SPECS if s.overrides and s.overrides[0].startswith("model.act")} == {
        "model.act=silu", "model.act=hardswish"}


def test_short_rows_share_one_schedule() -> None:
    for spec in design.SPECS:
        if spec.trained_here:
            cfg = design.short_config(spec)
            assert (cfg.optim.epochs, cfg.threads, cfg.model.family) == (3, 1, spec.family)


def test_measure_writes_json_markdown_and_plot_for_real_models(tmp_path: Path) -> None:
    import torch

    from build_engine.checkpoint import meta_for, save_checkpoint
    from build_engine.data.generate import generate_dataset
    from build_engine.model import build_detector, preset

    torch.manual_seed(0)
    model = build_detector(preset("pico", input_width=128, input_height=96)).eval()
    ckpt = save_checkpoint(tmp_path / "tiny.pt", model, meta_for(model))
    test_dir = generate_dataset(tmp_path / "test", 4, seed=3, width=160, height=96)
    calib = sorted((generate_dataset(tmp_path / "calib", 2, seed=4, width=160, height=96) / "images").glob("*.jpg"))
    specs = [design.DesignSpec("tiny", "yolo", "tiny", checkpoint=str(ckpt)),
             design.DesignSpec("tiny@160x128", "yolo", "tiny resized", checkpoint=str(ckpt), input_size=(160, 128))]
    rows = design.measure(specs, tmp_path / "out", test_dir, calib, latency_runs=2, threads=1)
    assert [r.key for r in rows] == ["tiny", "tiny@160x128"]
    assert rows[1].macs > rows[0].macs > 0  # a larger input costs more
    for r in rows:
        assert set(r.fp32) == set(r.int8) == {"map50_95", "map50", "precision", "recall"}
        assert r.fp32_ms["min"] > 0 and r.int8_ms["min"] > 0
    assert any(r.pareto for r in rows)
    md = design.write(rows, tmp_path / "out", {"host": "test", "threads": 1, "latency_runs": 2, "calib_images": 2})
    data = json.loads((tmp_path / "out" / "design.json").read_text())
    assert [r["key"] for r in data["rows"]] == ["tiny", "tiny@160x128"]
    assert (tmp_path / "out" / "design.png").stat().st_size > 1000
    assert "| tiny@160x128 | yolo | relu |" in md.read_text()


def test_missing_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    spec = design.DesignSpec("gone", "yolo", "gone", checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(ModelError, match="nope.pt"):
        design.load_row_model(spec, tmp_path)


def test_two_stage_macs_count_the_box_head_at_the_proposal_maximum() -> None:
    """A zeros image yields few proposals, so a per-layer profile undercounts the second stage;
    the table counts RoIAlign and the box head for every proposal the model may keep."""
    from build_engine.model import preset
    from build_engine.model.rcnn import RcnnDetector

    m = RcnnDetector(preset("pico", family="rcnn")).eval()
    per_roi = m.second_stage_macs(1)
    h = m.box_head
    head = (h.fc1.in_channels * h.fc1.out_channels * m.roi_size**2 + h.fc2.in_channels * h.fc2.out_channels
            + h.cls_score.in_channels * h.cls_score.out_channels + h.bbox_pred.in_channels * h.bbox_pred.out_channels)
    assert per_roi > head and m.second_stage_macs(m.post_nms_test) == m.post_nms_test * per_roi
    assert profile.two_stage_macs(m) > m.second_stage_macs(m.post_nms_test)


def test_the_build_records_two_stage_macs_at_the_proposal_maximum(tmp_path: Path) -> None:
    """``perception build`` writes the manifest's MACs through export_variant_onnx: for the
    two-stage family the same count as the design table, RoIAlign and the box head at the
    proposal maximum, not the profile of one blank-image forward."""
    import torch

    from build_engine.build import LoadedModel, export_variant_onnx
    from build_engine.fold import fold_batchnorm
    from build_engine.model import preset
    from build_engine.model.rcnn import RcnnDetector
    from build_engine.profile import profile_model

    torch.manual_seed(0)
    m = RcnnDetector(preset("pico", family="rcnn", input_width=256, input_height=160)).eval()
    lm = LoadedModel(m, ("a", "b", "c"), 256, 160, Path("rcnn.pt"), "", {})
    _, counts = export_variant_onnx(lm, tmp_path / "rcnn.fp32.onnx")
    one_forward = profile_model(fold_batchnorm(m)[0], (1, 3, 160, 256)).total_macs
    assert counts["macs"] == profile.two_stage_macs(m)
    assert counts["macs"] > one_forward
