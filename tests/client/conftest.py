"""Client test fixtures: a real detector server (tiny ONNX model) on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def start_server(manifest: Path, port: int = 0, **overrides: Any) -> tuple[Any, int]:
    """create_server with test-sized settings; returns (server, port)."""
    from server.app import create_server
    from server.config import ServerConfig

    settings: dict[str, Any] = dict(
        model=str(manifest), host="127.0.0.1", port=port, metrics_port=0, backends=("onnxruntime-cpu",),
        threads=1, warmup_iters=1, grace_s=1.0, max_workers=16,
    )
    settings.update(overrides)
    return create_server(ServerConfig(**settings))


@pytest.fixture(scope="module")
def server(tiny_manifest: Path) -> Iterator[str]:
    """Address "127.0.0.1:PORT" of a running server, shared by a test module."""
    srv, port = start_server(tiny_manifest)
    yield f"127.0.0.1:{port}"
    srv.shutdown(1.0)
