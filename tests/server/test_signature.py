"""Signed artifacts: a server given the fleet's public key loads only what the key's owner signed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from perception.cli import main as cli
from perception.errors import ManifestError
from tests.server.conftest import jpeg, request


def _keys(d: Path, name: str) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    priv, pub = d / f"{name}.pem", d / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def test_only_signed_artifacts_are_served(tiny_manifest: Path, tmp_path: Path, serve: Any) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_manifest.parent, art)
    priv, pub = _keys(tmp_path, "fleet")
    _, other_pub = _keys(tmp_path, "other")
    manifest = art / "manifest.json"
    with pytest.raises(ManifestError, match="no signature"):
        serve(model=str(manifest), manifest_public_key=str(pub))
    assert cli(["sign", "--model", str(art), "--key", str(priv)]) == 0
    run = serve(model=str(manifest), manifest_public_key=str(pub))
    assert run.stub.Detect(request("front", 0, jpeg()), timeout=10).status == 1
    with pytest.raises(ManifestError, match="does not verify"):
        serve(model=str(manifest), manifest_public_key=str(other_pub))
    data = json.loads(manifest.read_text())
    data["postprocess"]["score_threshold"] = 0.01  # tampered after signing
    manifest.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="does not verify"):
        serve(model=str(manifest), manifest_public_key=str(pub))
