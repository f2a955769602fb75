"""An artifact directory's life: built in a staging sibling, then renamed into place.

A failed or interrupted build or import never leaves a half-written artifact, and neither
replaces something that is not a previous artifact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from perception.errors import ManifestError


def check_out_dir(path: Path) -> None:
    """Refuse to build or import over something that is not a previous artifact (a checkpoint's
    directory, a source tree): the new artifact replaces what is there."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / "manifest.json").is_file())):
        raise ManifestError(f"{path}: exists and is not an artifact directory (no manifest.json); choose another "
                            "--out")


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Move a finished ``staging`` dir to ``out_dir``, replacing an old build there."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    old: Path | None = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    d.chmod(0o755)  # mkdtemp makes 0700; the server may run as another user
    return d
