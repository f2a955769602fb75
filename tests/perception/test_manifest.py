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


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.update(classes="person"), r"classes must be tuple\[str, \.\.\.\], got 'person'"),
        (lambda d: d.update(classes=[1, 2, 3, 4, 5, 6, 7]), "classes must be tuple"),
        (lambda d: d.update(classes=["car", "car"]), "class names must be non-empty and unique"),
        (lambda d: d.update(classes=["car", ""]), "class names must be non-empty and unique"),
        (lambda d: d.update(classes=[f"c{i}" for i in range(4097)]), r"number of classes must be in 1\.\.4096"),
        (lambda d: d["preprocess"].update(scale=float("nan")), "scale must be a finite number > 0, got nan"),
        (lambda d: d["preprocess"].update(scale=0), "scale must be a finite number > 0"),
        (lambda d: d["preprocess"].update(scale=-1), "scale must be a finite number > 0"),
        (lambda d: d["preprocess"].update(mean=[float("nan")] * 3), "mean must be finite"),
        (lambda d: d["preprocess"].update(mean=[0.0, 0.0]), "mean must be tuple"),
        (lambda d: d["preprocess"].update(std=[float("inf")] * 3), "std must be finite and > 0"),
        (lambda d: d["preprocess"].update(std=[1.0, -1.0, 1.0]), "std must be finite and > 0"),
        (lambda d: d["preprocess"].update(input_width=64.0), "input_width must be int, got 64.0"),
        (lambda d: d["preprocess"].update(input_height=True), "input_height must be int, got True"),
        (lambda d: d["preprocess"].update(input_width=8193), r"input_width must be in 1\.\.8192"),
        (lambda d: d["preprocess"].update(pad_value=114.7), "pad_value must be int"),
        (lambda d: d["preprocess"].update(letterbox="false"), "letterbox must be bool"),
        (lambda d: d["postprocess"].update(max_detections=2.5), "max_detections must be int, got 2.5"),
        (lambda d: d["postprocess"].update(max_detections=10_001), r"max_detections must be in 1\.\.10000"),
        (lambda d: d["postprocess"].update(pre_nms_topk=0.5), "pre_nms_topk must be int"),
        (lambda d: d["postprocess"].update(pre_nms_topk=10_001), r"pre_nms_topk must be in 1\.\.10000"),
        (lambda d: d["postprocess"].update(class_offset=0.5), "class_offset must be int"),
        (lambda d: d["postprocess"].update(class_agnostic="no"), "class_agnostic must be bool"),
        (lambda d: d["postprocess"].update(score_threshold=True), "score_threshold must be float"),
        (lambda d: d["postprocess"].update(outputs=["predictions"]), r"outputs must be dict\[str, str\]"),
        (lambda d: d["postprocess"].update(outputs={"predictions": 0}), r"outputs must be dict\[str, str\]"),
        (lambda d: d["variants"][0].update(file="model\0.onnx"), "relative path"),
        (lambda d: d["variants"][0].update(max_batch=0), r"max_batch must be in 1\.\.1024"),
        (lambda d: d["variants"][0].update(max_batch=2.0), "max_batch must be int"),
        (lambda d: d["variants"][0].update(input_shape=[-1, 3, 48.0, 64]), "input_shape must be"),
        (lambda d: d.update(variants="fp32"), "variants must be a list of objects"),
        (lambda d: d.update(variants=["fp32"]), "a variant must be an object"),
        (lambda d: d.update(preprocess=[64, 48]), "preprocess must be an object"),
    ],
)
def test_field_types_and_bounds_are_checked_on_load(tiny_manifest: Path, tmp_path: Path, mutate, match: str) -> None:
    """A value of the wrong JSON type, out of bounds or not finite is refused on load, naming the
    field: the server would otherwise serve nothing (a NaN scale), or fail on every frame (a
    float max_detections), at warm-up (a float input size) or at bind (outputs as a list)."""
    data = json.loads(tiny_manifest.read_text())
    mutate(data)
    with pytest.raises(ManifestError, match=match):
        load_manifest(_write(tmp_path, data), verify_checksums=False)


def test_json_integers_load_where_numbers_are_declared(tiny_manifest: Path, tmp_path: Path) -> None:
    """JSON has one number type: an integral value is a valid float field (a hand-written
    ``"scale": 1``); only the reverse, a float where an int is declared, is refused."""
    data = json.loads(tiny_manifest.read_text())
    data["preprocess"].update(scale=1, mean=[0, 0, 0], std=[1, 1, 1])
    data["postprocess"].update(score_threshold=0, iou_threshold=1)
    m = load_manifest(_write(tmp_path, data), verify_checksums=False)
    assert (m.preprocess.scale, m.preprocess.std, m.postprocess.iou_threshold) == (1, (1, 1, 1), 1)


def test_a_file_name_the_os_refuses_is_a_manifest_error(tiny_manifest: Path, tmp_path: Path) -> None:
    """A name the file system cannot even look up (longer than NAME_MAX) is refused like a
    missing file, not raised as an OSError past the loader."""
    data = json.loads(tiny_manifest.read_text())
    data["variants"][0]["file"] = "m" * 300 + ".onnx"
    with pytest.raises(ManifestError, match="cannot be resolved"):
        load_manifest(_write(tmp_path, data))
