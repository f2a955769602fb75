"""The dependency rules of ARCHITECTURE.md, enforced on the source: a vehicle image has no
PyTorch, and the build stage does not speak gRPC."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "perception": {"torch", "build_engine", "server", "client", "grpc", "onnxruntime"},
    "server": {"torch", "build_engine", "client", "torch_pruning"},
    "client": {"torch", "build_engine", "server", "onnxruntime"},
    "build_engine": {"grpc", "client"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_layering(package: str) -> None:
    files = [p for p in (ROOT / package).rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]
    assert files, f"no sources found in {package}/"
    offenders = {
        str(p.relative_to(ROOT)): sorted(imported_roots(p) & FORBIDDEN[package])
        for p in files
        if imported_roots(p) & FORBIDDEN[package]
    }
    assert not offenders, f"{package}/ imports what it must not: {offenders}"
