"""The manifest round-trips, validates on load, and is written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perception.errors import ManifestError
from perception.manifest import load_manifest, save_manifest


def test_round_trip(tiny_manifest: Path, tmp_path: Path) -> None:
    m = load_manifest(tiny_manifest)
    assert m.variant().precision == "fp32" and m.num_classes == 7
    out = save_manifest(m, tmp_path)
    (tmp_path / m.variant().file).write_bytes((tiny_manifest.parent / m.variant().file).read_bytes())
    again = load_manifest(out)
    assert again.to_dict() == m.to_dict()
    assert not list(tmp_path.glob(".manifest.*")), "temporary file left behind"


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps(data))
    return p


def test_checksum_mismatch_is_refused(tiny_manifest: Path, tmp_path: Path) -> None:
    data = json.loads(tiny_manifest.read_text())
    (tmp_path / "model.fp32.onnx").write_bytes(b"not the model")
    with pytest.raises(ManifestError, match="sha256"):
        load_manifest(_write(tmp_path, data))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.pop("classes"), "classes"),
        (lambda d: d.update(default_variant="int8"), "default_variant"),
        (lambda d: d["variants"][0].update(file="../escape.onnx"), "relative path"),
        (lambda d: d["variants"][0].update(precision="int4"), "precision"),
        (lambda d: d["preprocess"].update(color_order="YUV"), "color_order"),
        (lambda d: d.update(surprise=1), "unknown"),
        (lambda d: d.update(schema_version=99), "schema_version"),
    ],
)
def test_bad_manifests_get_clear_errors(tiny_manifest: Path, tmp_path: Path, mutate, match: str) -> None:
    data = json.loads(tiny_manifest.read_text())
    mutate(data)
    with pytest.raises(ManifestError, match=match):
        load_manifest(_write(tmp_path, data), verify_checksums=False)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "nope.json")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path)


def test_a_manifest_read_once_is_parsed_from_those_bytes(tiny_manifest: Path, tmp_path: Path) -> None:
    """``content``: the manifest is the bytes the caller read (and had verified), not a second
    read of the file, which may hold another manifest by then; the file still places the
    artifact directory, whose files are checked against the given manifest's hashes."""
    path = tmp_path / "manifest.json"
    checked = tiny_manifest.read_bytes()
    (tmp_path / "model.fp32.onnx").write_bytes((tiny_manifest.parent / "model.fp32.onnx").read_bytes())
    replaced = json.loads(checked)
    replaced["version"] = "replaced after the check"
    path.write_text(json.dumps(replaced))
    m = load_manifest(tmp_path, content=checked)
    assert m.version == "0.0.1" and m.root == tmp_path.resolve()
    assert load_manifest(path).version == "replaced after the check"
    (tmp_path / "model.fp32.onnx").write_bytes(b"not the model")
    with pytest.raises(ManifestError, match="sha256"):
        load_manifest(path, content=checked)
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(path, verify_checksums=False, content=b"{not json")


def _v1(tiny_manifest: Path) -> dict:
    """The tiny manifest as `perception build` wrote it before schema 2."""
    data = json.loads(tiny_manifest.read_text())
    v = data["variants"][0]
    for key in ("family", "parent", "weights", "calibration", "tensorrt_qdq", "source", "engine"):
        v.pop(key, None)
    v["extra"] = {"checkpoint": "detector.pt", "checkpoint_sha256": "ab" * 32}
    int8 = dict(v, name="int8", precision="int8",
                extra={"calibrator": "minmax", "calibration_sha256": "cd" * 32, "fp32_nodes": ["head"]})
    data["variants"].append(int8)
    data.update(schema_version=1, postprocess={**data["postprocess"], "output_layout": "xyxy_obj_cls"})
    data.pop("architecture", None)
    return data


def test_schema_1_migrates_explicitly(tiny_manifest: Path, tmp_path: Path) -> None:
    (tmp_path / "model.fp32.onnx").write_bytes((tiny_manifest.parent / "model.fp32.onnx").read_bytes())
    m = load_manifest(_write(tmp_path, _v1(tiny_manifest)))
    assert m.schema_version == 2 and m.postprocess.output_layout == "yolo_obj"
    fp32, int8 = m.variant("fp32"), m.variant("int8")
    assert (fp32.family, fp32.parent, int8.parent) == ("base", "", "fp32")
    assert fp32.weights is not None and fp32.weights.checkpoint == "detector.pt"
    assert int8.calibration is not None and int8.calibration.fp32_nodes == ("head",)
    assert m.to_dict()["schema_version"] == 2 and "extra" not in m.to_dict()["variants"][0]


def test_schema_1_without_checksums_is_refused(tiny_manifest: Path, tmp_path: Path) -> None:
    data = _v1(tiny_manifest)
    data["variants"][1]["sha256"] = ""
    with pytest.raises(ManifestError, match="no sha256 and cannot be verified"):
        load_manifest(_write(tmp_path, data), verify_checksums=False)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d["variants"][0].update(sha256=""), "sha256 must be 64"),
        (lambda d: d["postprocess"].update(output_layout="mystery"), "unknown output_layout"),
        (lambda d: d["variants"][0].update(parent="nowhere"), "parent"),
        (lambda d: d["variants"][0].update(format="tensorrt"), "source ONNX file"),
    ],
)
def test_schema_2_fields_are_validated(tiny_manifest: Path, tmp_path: Path, mutate, match: str) -> None:
    data = json.loads(tiny_manifest.read_text())
    mutate(data)
    with pytest.raises(ManifestError, match=match):
        load_manifest(_write(tmp_path, data), verify_checksums=False)


def test_a_link_out_of_the_artifact_dir_is_refused(tiny_manifest: Path, tmp_path: Path) -> None:
    data = json.loads(tiny_manifest.read_text())
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((tiny_manifest.parent / "model.fp32.onnx").read_bytes())
    art = tmp_path / "art"
    art.mkdir()
    (art / "model.fp32.onnx").symlink_to(outside)
    with pytest.raises(ManifestError, match="outside the artifact directory"):
        load_manifest(_write(art, data))
