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
