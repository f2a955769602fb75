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


def test_every_model_swapped_in_is_checked_too(tmp_path: Path, serve: Any) -> None:
    """The key guards every load, not only the first: an unsigned artifact given to the admin
    service (or put in place for a SIGHUP) is refused, and the signed model goes on serving."""
    import grpc

    from perception.v1 import admin_pb2 as apb
    from tests.server.test_lifecycle import TOKEN, admin, versioned_artifact

    priv, pub = _keys(tmp_path, "fleet")
    v1 = versioned_artifact(tmp_path / "v1", "0.0.1", seed=0)
    v2 = versioned_artifact(tmp_path / "v2", "0.0.2", seed=3)
    assert cli(["sign", "--model", str(v1.parent), "--key", str(priv)]) == 0
    run = serve(model=str(v1), manifest_public_key=str(pub), admin_port=0, admin_tokens=("adm1n",))
    with pytest.raises(grpc.RpcError) as refused:
        admin(run).LoadModel(apb.LoadModelRequest(manifest_path=str(v2)), metadata=TOKEN, timeout=30)
    assert "no signature" in str(refused.value.details())
    host = run.server.models
    assert host.current.version == "0.0.1" and host.refusals == 1
    assert cli(["sign", "--model", str(v2.parent), "--key", str(priv)]) == 0
    admin(run).LoadModel(apb.LoadModelRequest(manifest_path=str(v2)), metadata=TOKEN, timeout=30)
    assert host.current.version == "0.0.2"


def test_verify_manifest_returns_the_bytes_it_verified(tiny_manifest: Path, tmp_path: Path) -> None:
    from server.runtime.signature import verify_manifest

    art = tmp_path / "art"
    shutil.copytree(tiny_manifest.parent, art)
    priv, pub = _keys(tmp_path, "fleet")
    assert cli(["sign", "--model", str(art), "--key", str(priv)]) == 0
    assert verify_manifest(art, pub) == (art / "manifest.json").read_bytes()


def test_the_manifest_served_is_the_one_whose_signature_was_checked(
    tmp_path: Path, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest replaced right after its signature was checked (an artifact directory changed
    between the check and the load) is not what gets served: the manifest is parsed from the
    bytes that were verified, at start and for every model swapped in (the admin service here;
    a SIGHUP and a degrade step load through the same path)."""
    from perception.v1 import admin_pb2 as apb
    from server.runtime import signature
    from tests.server.test_lifecycle import TOKEN, admin, versioned_artifact

    priv, pub = _keys(tmp_path, "fleet")
    v1 = versioned_artifact(tmp_path / "v1", "0.0.1", seed=0)
    v2 = versioned_artifact(tmp_path / "v2", "0.0.2", seed=3)
    unsigned: dict[Path, bytes] = {}
    for manifest in (v1, v2):
        assert cli(["sign", "--model", str(manifest.parent), "--key", str(priv)]) == 0
        data = json.loads(manifest.read_text())
        data["version"] = "unsigned"  # loads, every file matches: only the signature tells it apart
        unsigned[manifest] = json.dumps(data).encode()
    verify = signature.verify_manifest

    def verify_then_replace(manifest: str | Path, key: str | Path) -> bytes:
        verified = verify(manifest, key)
        Path(manifest).write_bytes(unsigned[Path(manifest)])
        return verified

    monkeypatch.setattr(signature, "verify_manifest", verify_then_replace)
    run = serve(model=str(v1), manifest_public_key=str(pub), admin_port=0, admin_tokens=("adm1n",))
    assert v1.read_bytes() == unsigned[v1]  # replaced after the check, before the load
    assert run.stub.Detect(request("front", 0, jpeg()), timeout=10).model_version == "0.0.1"
    status = admin(run).LoadModel(apb.LoadModelRequest(manifest_path=str(v2)), metadata=TOKEN, timeout=30)
    assert v2.read_bytes() == unsigned[v2]
    assert status.version == "0.0.2" and run.server.models.current.version == "0.0.2"
    assert run.stub.Detect(request("front", 1, jpeg()), timeout=10).model_version == "0.0.2"
