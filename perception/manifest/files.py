"""The manifest on disk: loading it with every file it names checked against its sha256, and
saving it atomically."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from perception.errors import ManifestError
from perception.manifest.fields import check_relative
from perception.manifest.parse import manifest_from_dict
from perception.manifest.schema import Manifest


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_file(root: Path, name: str, sha256: str, what: str) -> Path:
    """``root/name`` as a regular file inside ``root`` (after resolving links) with this sha256.

    The file is hashed here and read again by whoever opens the path returned: a loader that
    must run exactly the checked bytes hashes the bytes it loads instead (``read_checked``)."""
    check_relative(name, what)
    path = root / name
    try:
        resolved = path.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        raise ManifestError(f"{what} names {name}, which does not exist") from None
    except OSError as exc:  # a name the OS refuses, e.g. too long (check_relative refused NUL bytes)
        raise ManifestError(f"{what} names {name!r}, which cannot be resolved: {exc}") from None
    if not resolved.is_relative_to(root.resolve()):
        raise ManifestError(f"{what} names {name}, which resolves outside the artifact directory")
    if not resolved.is_file():
        raise ManifestError(f"{what} names {name}, which is not a regular file")
    try:
        digest = sha256_file(resolved)
    except OSError as exc:
        raise ManifestError(f"{what}: cannot read {name}: {exc}") from exc
    if digest != sha256:
        raise ManifestError(_mismatch(what, name))
    return resolved


def read_checked(path: Path, sha256: str, what: str) -> bytes:
    """The bytes of ``path``, read once, if they have this sha256.

    Loading these bytes loads what was checked: opening the path again after a check would load
    whatever the file holds by then (an artifact directory changed in between). Where the file
    lies was checked when its manifest loaded (``check_file``); its content is bound here."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{what}: cannot read {path.name}: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ManifestError(_mismatch(what, path.name))
    return data


def _mismatch(what: str, name: str) -> str:
    return f"{what}: {name} does not match its sha256 in the manifest (corrupt or replaced file)"


def load_manifest(
    path: str | os.PathLike[str], verify_checksums: bool = True, *, content: bytes | None = None
) -> Manifest:
    """Load ``manifest.json`` (or a directory holding one) and check every file it names.

    content: the manifest's bytes, when the caller has read them already: the manifest is parsed
    from exactly those (``path`` still places the artifact directory). A server that verified
    the manifest's signature passes the bytes it verified (``verify_manifest`` returns them):
    reading the file a second time would parse whatever it holds by then, signed or not.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    try:
        data = json.loads(p.read_bytes() if content is None else content)
    except FileNotFoundError as exc:
        raise ManifestError(f"{p}: no such manifest") from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{p}: cannot read manifest: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{p}: manifest must be a JSON object")
    try:
        manifest = manifest_from_dict(data, root=p.parent.resolve())
    except ManifestError as exc:
        raise ManifestError(f"{p}: {exc}") from exc
    if verify_checksums:
        assert manifest.root is not None
        if manifest.verification is not None:
            for f in manifest.verification.frames:
                try:
                    check_file(manifest.root, f.file, f.sha256, "verification frame")
                except ManifestError as exc:
                    raise ManifestError(f"{p}: {exc}") from exc
        priors = manifest.postprocess.priors
        if priors is not None:
            try:
                check_file(manifest.root, priors.file, priors.sha256, "priors")
            except ManifestError as exc:
                raise ManifestError(f"{p}: {exc}") from exc
        for v in manifest.variants:
            for name, sha in v.files().items():
                try:
                    check_file(manifest.root, name, sha, f"variant {v.name!r}")
                except ManifestError as exc:
                    raise ManifestError(f"{p}: {exc}") from exc
    return manifest


def save_manifest(manifest: Manifest, directory: str | os.PathLike[str]) -> Path:
    """Write ``directory/manifest.json`` atomically: a crash never leaves half a manifest."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    target = d / "manifest.json"
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest.to_dict(), f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the server may run as another user
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
