"""``perception verify-engine`` comparing ONNX variants on real frames; TensorRT absent -> exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perception.manifest import Manifest, PostprocessSpec, PreprocessSpec, Variant, save_manifest, sha256_file
from server.runtime.availability import tensorrt_installed
from server.verify_cli import main
from tests.server.conftest import jpeg
from tests.tiny_model import CLASSES, make_tiny_onnx


def make_artifact(tmp_path, names_files, frames: int = 4):
    """A manifest over two tiny models (a.onnx, b.onnx: different weights, so they must not pass
    as equal), and a folder of JPEG frames. names_files: (name, file, family, precision)."""
    d = tmp_path / "art"
    d.mkdir()
    make_tiny_onnx(d / "a.onnx", seed=0)
    make_tiny_onnx(d / "b.onnx", seed=1)
    variants = tuple(
        Variant(name=n, file=f, precision=prec, sha256=sha256_file(d / f), input_shape=(-1, 3, 48, 64), family=fam)
        for n, f, fam, prec in names_files
    )
    m = Manifest("tiny", "1", CLASSES, PreprocessSpec(64, 48), PostprocessSpec(score_threshold=0.3), variants, "fp32")
    save_manifest(m, d)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(frames):
        (folder / f"{i:03d}.jpg").write_bytes(jpeg(160, 120, seed=i))
    return d / "manifest.json", folder


@pytest.fixture
def two_variants(tmp_path):
    return make_artifact(tmp_path, (("fp32", "a.onnx", "base", "fp32"), ("other", "b.onnx", "base", "int8"),
                                    ("same", "a.onnx", "base", "int8")))


def test_identical_variant_passes(two_variants, capsys):
    manifest, frames = two_variants
    argv = ["--model", str(manifest), "--variant", "same", "--frames", str(frames), "--json", "--threads", "1"]
    assert main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["max_abs_diff"] == 0.0 and rep["vanished"] == 0.0 and rep["appeared"] == 0.0 and rep["frames"] == 4
    assert rep["detections_reference"] > 0 and rep["precision"] == "int8" and rep["max_changed"] == 0.15


def test_different_variant_fails(two_variants, capsys):
    manifest, frames = two_variants
    assert main(["--model", str(manifest), "--variant", "other", "--frames", str(frames), "--threads", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "vanished" in out


@pytest.mark.skipif(tensorrt_installed(), reason="TensorRT is installed here")
def test_engine_without_tensorrt_says_so(two_variants, tmp_path, capsys):
    manifest, frames = two_variants
    assert main(["--model", str(manifest), "--engine", str(tmp_path / "x.engine"), "--frames", str(frames)]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and len(err.strip().splitlines()) == 1


def test_pruned_candidate_is_judged_against_its_own_fp32(tmp_path, capsys):
    """A pruned model's variants are compared with the pruned FP32 model, not the unpruned one
    (which has other weights and would fail them all)."""
    manifest, frames = make_artifact(tmp_path, (("fp32", "a.onnx", "base", "fp32"),
                                                ("pruned_fp32", "b.onnx", "pruned", "fp32"),
                                                ("pruned_copy", "b.onnx", "pruned", "int8")), 3)
    argv = ["--model", str(manifest), "--variant", "pruned_copy", "--frames", str(frames), "--json", "--threads", "1"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff"] == 0.0
    assert main([*argv, "--reference", "fp32"]) == 1  # the unpruned model is another model


def test_default_frames_are_found_from_any_working_directory(two_variants, tmp_path):
    """With no --frames, the bundled drive is found from the package, not the working directory."""
    manifest, _ = two_variants
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "perception.cli", "verify-engine", "--model", str(manifest),
                           "--variant", "same", "--num-frames", "3", "--json", "--threads", "1"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["frames"] == 3
