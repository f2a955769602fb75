"""``perception build`` end to end on a tiny real detector: every variant, the gate, the
manifest, the report; and bad input that must leave no half-written artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perception.errors import ModelError


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny checkpoint, a pruned copy (untrained, so it fails its gate), a val set labelled with
    the FP32 model's own detections (FP32 mAP ~ 1: drift is measurable), calibration images."""
    from build_engine.build import export_fp32_artifact
    from build_engine.checkpoint import meta_for, save_checkpoint
    from build_engine.data.generate import generate_dataset
    from build_engine.prune import PruneOptions, prune_model
    from tests.build_engine.test_gate import make_pseudo_labelled_set
    from tests.build_engine.test_prune import _images
    from tests.build_engine.test_quantize import _tiny_detector

    tmp = tmp_path_factory.mktemp("build")
    model = _tiny_detector()
    ckpt = save_checkpoint(tmp / "ckpt" / "detector.pt", model, meta_for(model))
    pruned, info = prune_model(model, _images(2), PruneOptions(ratio=0.5))
    pruned_ckpt = save_checkpoint(tmp / "ckpt" / "pruned.pt", pruned, meta_for(pruned, extra={"pruned": info}))
    val = make_pseudo_labelled_set(export_fp32_artifact(ckpt, tmp / "ref"), tmp / "val", n=8)
    calib = generate_dataset(tmp / "calib", 4, seed=1, width=320, height=180)
    return {"ckpt": ckpt, "pruned": pruned_ckpt, "val": val, "calib": Path(calib) / "images", "tmp": tmp}


def _argv(inputs, out: Path, *extra: str) -> list[str]:
    return ["build", "--out", str(out), "--checkpoint", str(inputs["ckpt"]), "--data", str(inputs["val"]),
            "--calib-data", str(inputs["calib"]), "--latency-runs", "3", "--threads", "1", "--no-scaling", *extra]


def test_full_build_gate_manifest_report(inputs, capsys, caplog):
    import onnx

    from perception.cli import main
    from perception.manifest import load_manifest

    out = inputs["tmp"] / "art"
    rc = main(_argv(inputs, out, "--pruned", str(inputs["pruned"]), "--nms-in-graph"))
    err = capsys.readouterr().err
    assert "TensorRT not available here: skipping engine build" in caplog.text
    # The untrained pruned model cannot hold the FP32 model's detections: its gate fails, the
    # build says which, and the artifact is complete; the default variant passed, so exit 0.
    assert rc == 0, err[-2000:]
    assert "these variants failed their gate" in err and "pruned_fp32" in err
    m = load_manifest(out / "manifest.json")  # checks every sha256
    names = [v.name for v in m.variants]
    assert names == ["fp32", "fp16", "int8", "pruned_fp32", "pruned_fp16", "pruned_int8"]
    for v in m.variants:
        assert len(v.sha256) == 64 and v.input_shape == (-1, 3, 96, 128) and v.macs > 0 and v.params > 0
        assert set(v.metrics) == {"map50_95", "map50", "precision", "recall"}
        assert v.latency_ms["p95"] >= v.latency_ms["p50"] >= v.latency_ms["min"] > 0
        assert {"vanished", "moved", "appeared"} <= set(v.parity)
        assert isinstance(v.gate["passed"], bool) and v.gate["reason"]
        assert "BatchNormalization" not in [n.op_type for n in onnx.load(str(m.path_of(v))).graph.node]
    fp32, int8, pr = m.variant("fp32"), m.variant("int8"), m.variant("pruned_fp32")
    assert fp32.metrics["map50"] > 0.85
    assert not pr.gate["passed"] and "outside" in pr.gate["reason"]
    assert pr.macs < 0.5 * fp32.macs and pr.params < 0.5 * fp32.params
    assert int8.calibration is not None
    assert int8.precision == "int8" and int8.calibration.set_sha256 == m.provenance["calibration"]["sha256"]
    # Provenance is declared, not inferred from names.
    provenance = (int8.family, int8.parent, pr.family, m.variant("pruned_int8").parent)
    assert provenance == ("base", "fp32", "pruned", "pruned_fp32")
    assert pr.weights is not None and fp32.weights is not None
    assert pr.weights.pruning and fp32.weights.sha256 == m.provenance["checkpoint"]["sha256"]
    # Each INT8 variant ships its TensorRT twin (signed, zero points 0), hashed and scored.
    from perception.manifest import Precision, sha256_file
    from server.runtime.tensorrt_engines import tensorrt_source

    cals, gates = {}, {}
    for name in ("int8", "pruned_int8"):
        twin = m.variant(name).tensorrt_qdq
        assert twin is not None, f"{name} ships no TensorRT twin"
        path = out / twin.file
        if twin.passed:
            assert tensorrt_source(m, m.variant(name), Precision.INT8) == (path, sha256_file(path))
        else:  # a device must not build an INT8 engine from a twin that failed its gate
            with pytest.raises(ModelError, match="failed its accuracy gate"):
                tensorrt_source(m, m.variant(name), Precision.INT8)
        gates[name] = twin.passed
        cals[name] = twin.calibrator
        assert set(twin.metrics) == {"map50_95", "map50", "precision", "recall"}
        assert isinstance(twin.gate["passed"], bool)
        zps = [i for i in onnx.load(str(path)).graph.initializer if i.name.endswith("zero_point")]
        assert zps and {z.data_type for z in zps} == {onnx.TensorProto.INT8}
    # The untrained pruned copy has a near-constant map that a 2048-bin histogram cannot resolve:
    # its percentile calibration falls back to min-max, says so, and the manifest records it.
    assert cals == {"int8": "percentile", "pruned_int8": "minmax"}, cals
    # Neither untrained model survives signed, symmetric INT8 within its gate (the trained default
    # does: README); the build says so, and a device refuses to build from them (above).
    assert gates == {"int8": False, "pruned_int8": False}, gates
    assert "the TensorRT Q/DQ model of int8 failed its gate" in caplog.text
    assert "percentile calibration failed" in caplog.text
    passed = [v for v in m.variants if v.gate["passed"]]
    assert m.default_variant == min(passed, key=lambda v: v.latency_ms["min"]).name
    cal = m.provenance["calibration"]
    assert cal["calibrator"] == "minmax" and len(cal["images"]) == 4 and len(cal["sha256"]) == 64
    assert m.provenance["git_sha"] and m.provenance["libraries"]["onnxruntime"]
    assert (m.preprocess.input_width, m.preprocess.input_height) == (128, 96)
    assert m.extra["nms_in_graph"]["file"] == "model.fp32.nms.onnx" and (out / "model.fp32.nms.onnx").is_file()
    report = (out / "report.md").read_text()
    for needle in ("## Variants", "pruned_fp32", "## TensorRT INT8 models", "model.int8.trt.onnx",
                   "## Quantization", "SQNR", "## Pruning", "MACs"):
        assert needle in report
    assert (out / "plots" / "activation_histograms.png").is_file()
    assert (out / "plots" / "weight_histograms.png").is_file()
    assert not list(out.parent.glob(".art.building-*"))


def test_continue_on_fail_exits_zero(inputs):
    from perception.cli import main
    from perception.manifest import load_manifest

    out = inputs["tmp"] / "art2"
    assert main(_argv(inputs, out, "--precisions", "fp32", "--pruned", str(inputs["pruned"]),
                      "--continue-on-fail", "--no-report")) == 0
    m = load_manifest(out)
    assert [v.name for v in m.variants] == ["fp32", "pruned_fp32"] and m.default_variant == "fp32"
    assert not (out / "report.md").exists()


def _assert_untouched(out: Path, before: str | None) -> None:
    if before is None:
        assert not out.exists()
    else:
        assert (out / "manifest.json").read_text() == before
    assert not list(out.parent.glob(f".{out.name}.building-*"))


@pytest.mark.parametrize("case", ["missing", "corrupt", "empty_calib", "bad_precision"])
def test_bad_input_one_line_error_no_half_manifest(inputs, tmp_path, capsys, case):
    from perception.cli import main

    out = tmp_path / "art"
    before = None
    if case in ("corrupt", "empty_calib"):  # an existing good build must survive a failed one
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps({"previous": True}))
        before = (out / "manifest.json").read_text()
    argv = _argv(inputs, out)
    if case == "missing":
        argv[argv.index("--checkpoint") + 1] = str(tmp_path / "nope.pt")
    elif case == "corrupt":
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
        argv[argv.index("--checkpoint") + 1] = str(bad)
    elif case == "empty_calib":
        (tmp_path / "empty").mkdir()
        argv[argv.index("--calib-data") + 1] = str(tmp_path / "empty")
    else:
        argv += ["--precisions", "fp16,int8"]
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("perception build")]
    assert rc != 0 and len(err) == 1, err
    assert {"missing": "no such checkpoint", "corrupt": "not a readable", "empty_calib": "empty",
            "bad_precision": "fp32"}[case] in err[0]
    _assert_untouched(out, before)


def test_scaling_table_rows_are_real_models():
    from build_engine.scaling import markdown_table, scaling_table
    from tests.build_engine.test_quantize import _tiny_detector

    model = _tiny_detector()  # pico widths/depths at 128x96
    scored = []

    def score(path, w, h):
        scored.append((w, h))
        return 0.5

    quantized = []

    def quantize(src, out):
        import shutil

        quantized.append(src)
        return Path(shutil.copy(src, out))  # the timing path is what is under test here

    rows = scaling_table(model, score, runs=2, threads=1, resolutions=(("double", 256, 192), ("base", 128, 96)),
                         depths=(1.0,), widths=(0.125, 0.25), quantize=quantize)
    by = {r.label: r for r in rows}
    base = by["base (128x96)"]
    assert by["double (256x192)"].macs == pytest.approx(4 * base.macs, rel=0.02)  # MACs ~ pixels
    assert by["double (256x192)"].params == base.params
    assert by["depth x1.0"].macs > base.macs and by["depth x1.0"].params > base.params
    assert by["width x0.25"].params > 3 * base.params  # params ~ width^2
    assert by["width x0.25"].map50_95 is None and "training" in by["width x0.25"].note
    assert sorted(set(scored)) == [(128, 96), (256, 192)]  # trained weights scored once per input size
    assert all(r.latency_ms > 0 for r in rows)
    assert len(quantized) == 2  # one per width; x0.125 is the base model, exported once
    assert by["width x0.25"].int8_ratio is not None and by["width x0.125"].int8_ratio is not None
    assert by["base (128x96)"].int8_ratio == by["width x0.125"].int8_ratio
    assert "| resolution | double (256x192) |" in markdown_table(rows, base.macs)


def test_scaling_table_counts_a_two_stage_model_as_the_manifest_does(tmp_path):
    """The table's "vs deployed" column divides by the manifest's MACs, which count a two-stage
    model's RoIAlign and box head at the proposal maximum; its rows count them the same way (a
    profile of one blank-image forward misses RoIAlign), so the deployed model's row is 1.00x."""
    import torch

    from build_engine.build import LoadedModel, export_variant_onnx
    from build_engine.model import preset
    from build_engine.model.rcnn import RcnnDetector
    from build_engine.profile import two_stage_macs
    from build_engine.scaling import markdown_table, scaling_table

    torch.manual_seed(0)
    model = RcnnDetector(preset("pico", family="rcnn", input_width=128, input_height=96)).eval()
    lm = LoadedModel(model, ("a", "b", "c"), 128, 96, tmp_path / "rcnn.pt", "", {})
    _, counts = export_variant_onnx(lm, tmp_path / "rcnn.fp32.onnx")  # the manifest's figure
    rows = scaling_table(model, None, runs=1, threads=1, resolutions=(("deployed", 128, 96), ("double", 256, 192)),
                         depths=(), widths=())
    by = {r.label: r for r in rows}
    assert by["deployed (128x96)"].macs == counts["macs"]
    double = RcnnDetector(preset("pico", family="rcnn", input_width=256, input_height=192))
    assert by["double (256x192)"].macs == two_stage_macs(double)
    deployed_row = f"| deployed (128x96) | 128x96 | 0.125 | 0.33 | {counts['macs'] / 1e6:.1f} M | 1.00x |"
    assert deployed_row in markdown_table(rows, counts["macs"])


def _has_tensorrt_gpu() -> bool:
    from build_engine.build import tensorrt_available

    return tensorrt_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_tensorrt_gpu(), reason="needs TensorRT and an NVIDIA GPU (CPU-only machine)")
def test_tensorrt_engines_are_built_fingerprinted_and_gated(inputs):
    from perception.cli import main
    from perception.manifest import load_manifest
    from server.runtime.fingerprint import fingerprint_path

    out = inputs["tmp"] / "trt"
    assert main(_argv(inputs, out, "--continue-on-fail", "--no-report")) == 0
    m = load_manifest(out)
    trt = {v.name: v for v in m.variants if v.format == "tensorrt"}
    assert set(trt) == {"trt_fp16", "trt_int8"}  # (no pruned checkpoint in this build)
    for v in trt.values():
        assert fingerprint_path(m.path_of(v)).is_file() and v.parent == v.name.removeprefix("trt_")
        assert v.source is not None and v.engine is not None and v.engine.onnx_sha256 == v.source.sha256
        assert set(v.metrics) == {"map50_95", "map50", "precision", "recall"} and v.latency_ms["p50"] > 0


@pytest.mark.parametrize("case", ["ratio", "budget"])
def test_latency_gates_reach_the_manifest(inputs, case):
    """Every variant is gated on latency too: a ratio no FP16 build can meet fails FP16 alone;
    a p95 budget no model can meet fails every variant, FP32 included, and the default falls
    back to the fastest of all (the build reports the failure)."""
    from build_engine.build import BuildOptions, GateThresholds, run_build
    from perception.manifest import load_manifest

    gates = (GateThresholds(fp16_max_latency_ratio=0.01, latency_budget_ms=1e4) if case == "ratio"
             else GateThresholds(latency_budget_ms=1e-3))
    opts = BuildOptions(out_dir=inputs["tmp"] / f"lat_{case}", checkpoint=inputs["ckpt"], precisions=("fp32", "fp16"),
                        data_dir=inputs["val"], calib_dir=inputs["calib"], latency_runs=3, threads=1, report=False,
                        scaling=False, gates=gates)
    manifest_path, all_passed = run_build(opts)
    m = load_manifest(manifest_path)
    fp32, fp16 = m.variant("fp32"), m.variant("fp16")
    assert not all_passed and not fp16.gate["passed"]
    assert "mAP50-95 drop" in fp16.gate["reason"] and "x fp32's" in fp16.gate["reason"]
    assert fp16.gate["latency_ratio"] == pytest.approx(fp16.latency_ms["min"] / fp32.latency_ms["min"], rel=1e-3)
    assert m.extra["gates_latency"]["budget_p95_ms"] == gates.latency_budget_ms
    assert m.extra["gates_points"] == {"fp16": 0.2, "int8": 1.0, "pruned": 1.5}
    if case == "ratio":
        assert "outside the 0.01x gate" in fp16.gate["reason"] and "within the 10000 ms budget" in fp16.gate["reason"]
        assert fp32.gate["passed"] and m.default_variant == "fp32"
    else:
        assert not fp32.gate["passed"] and "reference (FP32); p95 latency" in fp32.gate["reason"]
        assert "outside the 0.001 ms budget" in fp16.gate["reason"]
        assert m.default_variant == min(m.variants, key=lambda v: v.latency_ms["min"]).name


def test_data_scored_against_other_classes_or_no_labels_is_refused_before_any_work(inputs, capsys):
    """--data whose categories are the model's classes in another order would score every class
    id against another class, and data with no labelled object scores "no data" for every
    variant, which passes every relative gate: both are refused, and nothing is written."""
    import json
    import shutil

    from perception.cli import main

    for case in ("reordered", "unlabelled"):
        data = inputs["tmp"] / f"val_{case}"
        shutil.copytree(inputs["val"], data)
        gt = json.loads((data / "annotations.json").read_text())
        if case == "reordered":
            names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
            for c, name in zip(sorted(gt["categories"], key=lambda c: c["id"]), [names[1], names[0], *names[2:]],
                               strict=True):
                c["name"] = name
        else:
            gt["annotations"] = []
        (data / "annotations.json").write_text(json.dumps(gt))
        out = inputs["tmp"] / f"art_{case}"
        argv = _argv(inputs, out)
        argv[argv.index("--data") + 1] = str(data)
        assert main(argv) != 0
        err = capsys.readouterr().err
        needle = "scored against another class" if case == "reordered" else "no labelled object"
        assert needle in err, err
        assert not out.exists()


def test_an_export_that_does_not_compute_the_checkpoint_is_refused(inputs, tmp_path) -> None:
    """Every gate is relative to the exported FP32 model: an export that changed the model (BN
    folding, the exporter, onnxslim) would move the reference and every variant together. The
    build checks the export against its checkpoint; here another checkpoint's export fails it."""
    from build_engine.build import check_export, export_variant_onnx, load_model
    from perception.errors import ModelError

    lm = load_model(inputs["ckpt"])
    path, _ = export_variant_onnx(lm, tmp_path / "model.fp32.onnx")  # checked: it passes
    other, _ = export_variant_onnx(load_model(inputs["pruned"]), tmp_path / "other.fp32.onnx")
    with pytest.raises(ModelError, match="differs from the checkpoint"):
        check_export(lm, other)
    check_export(lm, path)


def test_the_export_check_holds_scores_to_their_own_scale(tmp_path) -> None:
    """A YOLO-style output row holds pixel boxes beside probabilities. An export whose class
    scores alone are off (by less than 1e-3 of the boxes' pixel range: one scale for the whole
    output passed it) is refused by the per-column check."""
    import copy

    import torch

    from build_engine.build import LoadedModel, check_export
    from build_engine.export import export_onnx
    from build_engine.model.detector import HeadLevel
    from tests.build_engine.test_quantize import H, W, _tiny_detector

    model = _tiny_detector()
    off = copy.deepcopy(model)
    with torch.no_grad():
        for head in off.heads:
            assert isinstance(head, HeadLevel) and head.cls_pred.bias is not None
            head.cls_pred.bias += 0.2  # an export error that touches class scores only
        x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(0))
        want, got = model(x), off(x)
    score_diff = float((want[..., 5:] - got[..., 5:]).abs().max())
    assert 1e-2 < score_diff < 1e-3 * float(want.abs().max())
    lm = LoadedModel(model, tuple(f"c{i}" for i in range(model.cfg.num_classes)), W, H, tmp_path / "x.pt", "", {})
    with pytest.raises(ModelError, match="output 'output' column 5 differs"):  # the first class score
        check_export(lm, export_onnx(off, tmp_path / "off.onnx", (H, W)))
    check_export(lm, export_onnx(model, tmp_path / "model.onnx", (H, W)))


def test_cli_gate_flags_become_the_thresholds() -> None:
    from build_engine.build_cli import build_parser, gate_thresholds
    from perception.errors import ConfigError

    g = gate_thresholds(build_parser().parse_args(
        ["--out", "x", "--gate-int8-latency", "0.9", "--gate-fp16-latency", "2.0", "--latency-budget-ms", "15"]
    ))
    assert (g.int8_max_latency_ratio, g.fp16_max_latency_ratio, g.latency_budget_ms) == (0.9, 2.0, 15.0)
    assert gate_thresholds(build_parser().parse_args(["--out", "x"])).latency_budget_ms is None
    with pytest.raises(ConfigError):
        gate_thresholds(build_parser().parse_args(["--out", "x", "--gate-int8-latency", "-1"]))


def test_input_size_exports_the_same_weights_at_a_larger_input(inputs, capsys):
    """--input-size: the YOLO-style detector is fully convolutional, so the same weights serve at
    another input size; the manifest, the ONNX input and the decode grid follow it (a grid left
    at the trained size failed the export), and its detections land where the trained size's do."""
    import numpy as np

    from perception.cli import main
    from perception.manifest import load_manifest
    from perception.pipeline import FrameInput, FramePipeline, RequestOptions
    from server.runtime.factory import RuntimeSettings, backend_for

    base = load_manifest(inputs["tmp"] / "ref")
    w, h = base.preprocess.input_width * 2, base.preprocess.input_height * 2
    out = inputs["tmp"] / "art_big"
    assert main(_argv(inputs, out, "--precisions", "fp32", "--continue-on-fail", "--no-report",
                      "--input-size", f"{w}x{h}")) == 0
    m = load_manifest(out)
    assert (m.preprocess.input_width, m.preprocess.input_height) == (w, h)
    # Another artifact, another version: the degrader steps between variants of one version only.
    assert m.version == f"{base.version}.{w}x{h}" and f"{w}x{h}" not in base.version
    frame = FrameInput("front", 0, 0, raw=None, encoded=(inputs["calib"] / sorted(
        p.name for p in inputs["calib"].iterdir())[0]).read_bytes())
    boxes = []
    for manifest in (base, m):
        backend, _ = backend_for(manifest, "", RuntimeSettings(threads=1, max_batch=1))
        pipe = FramePipeline.from_manifest(manifest)
        pipe.bind_outputs(backend.outputs)
        boxes.append(pipe.run_batch([frame], RequestOptions(score_threshold=0.0), backend.infer)[0])
    assert boxes[1].boxes.shape[0] > 0 and np.isfinite(boxes[1].boxes).all()
    # Boxes come back in source pixels either way: the strongest box is in the same place.
    assert np.abs(boxes[0].boxes[0] - boxes[1].boxes[0]).max() < 0.25 * max(frame_size(frame))
    for bad in ("1000x576", "big"):
        assert main(_argv(inputs, inputs["tmp"] / "art_bad", "--input-size", bad)) != 0
    assert "--input-size" in capsys.readouterr().err


def frame_size(frame) -> tuple[int, int]:
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(frame.encoded, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img.shape[1], img.shape[0]


def test_provenance_names_the_commit_an_image_was_built_from(monkeypatch) -> None:
    """An image or install without .git records its commit in PERCEPTION_GIT_SHA; the build's
    provenance said "unknown" there."""
    from build_engine.provenance import git_sha

    monkeypatch.setenv("PERCEPTION_GIT_SHA", "0123abcd")
    assert git_sha() == "0123abcd"
    monkeypatch.setenv("PERCEPTION_GIT_SHA", "unknown")
    assert git_sha() != "unknown"  # this checkout has .git
