"""Where an artifact came from: the commit of the code that built it and the libraries it used.

Recorded in every manifest's ``provenance`` by the build and the importer alike.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_sha() -> str:
    """The commit of this code: ``PERCEPTION_GIT_SHA`` when set (an image or install built
    without ``.git`` records it there), else ``git rev-parse HEAD``; "unknown" without either."""
    env = os.environ.get("PERCEPTION_GIT_SHA", "")
    if env and env != "unknown":
        return env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxslim", "torch-pruning", "numpy", "opencv-python-headless"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out
