"""Shared fixtures. Nothing here writes into the working tree: everything goes to tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny_model import make_tiny_artifact

# Two cores shared by the test process, a server under test and its clients.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """manifest.json of a tiny real ONNX detector (random weights), built without torch."""
    return make_tiny_artifact(tmp_path_factory.mktemp("tiny_artifact"))
