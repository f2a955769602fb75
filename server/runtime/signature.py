"""Detached Ed25519 signatures of an artifact's manifest.

The manifest names every file of the artifact with its sha256 (and the server checks each one
before loading it), so a signature over ``manifest.json`` covers the whole artifact: a device
configured with the fleet's public key loads only artifacts the build host signed. The manifest
is parsed from the bytes verified, and an onnxruntime model, a shipped TensorRT engine, the
ONNX model TensorRT builds an engine from, an SSD family's priors and the verification frames
are loaded from the bytes hashed, so a file changed after its check is not what runs. An ONNX
model with external weights, which onnxruntime must open by path to find them, is bound only as
far as the directory is not written between the check and the load. Engines TensorRT builds
on the device are cached outside the manifest (their file names encode the device and the
source's hash): with a public key, keep that cache (``--engine-cache-dir``) where the
artifact's deliverer cannot write, not in the artifact's ``engines/`` directory, the default.
``manifest.json.sig`` holds the 64-byte signature, base64-encoded.
"""

from __future__ import annotations

import base64
from pathlib import Path

from perception.errors import ConfigError, ManifestError

SUFFIX = ".sig"


def _manifest_file(path: str | Path) -> Path:
    p = Path(path)
    return p / "manifest.json" if p.is_dir() else p


def sign_manifest(manifest: str | Path, private_key_pem: str | Path) -> Path:
    """Write ``manifest.json.sig`` beside the manifest with the Ed25519 private key (PEM)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = _manifest_file(manifest)
    try:
        key = load_pem_private_key(Path(private_key_pem).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{private_key_pem}: not a readable unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{private_key_pem}: not an Ed25519 private key")
    sig = path.with_name(path.name + SUFFIX)
    sig.write_text(base64.b64encode(key.sign(path.read_bytes())).decode() + "\n")
    return sig


def verify_manifest(manifest: str | Path, public_key_pem: str | Path) -> bytes:
    """The manifest's bytes, read once, if ``manifest.json.sig`` is a valid signature of them by
    the Ed25519 public key (PEM); ManifestError otherwise.

    Load the manifest from the bytes returned (``load_manifest(path, content=...)``), not from the
    file again: an artifact directory changed between the check and a second read would get an
    unsigned manifest served."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    path = _manifest_file(manifest)
    try:
        key = load_pem_public_key(Path(public_key_pem).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{public_key_pem}: not a readable PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{public_key_pem}: not an Ed25519 public key")
    sig = path.with_name(path.name + SUFFIX)
    try:
        signature = base64.b64decode(sig.read_text().strip(), validate=True)
        content = path.read_bytes()
        key.verify(signature, content)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no signature ({sig.name}) and a public key is configured") from None
    except (OSError, ValueError, InvalidSignature) as exc:
        raise ManifestError(f"{path}: signature {sig.name} does not verify with {Path(public_key_pem).name}"
                            f" ({type(exc).__name__})") from None
    return content
