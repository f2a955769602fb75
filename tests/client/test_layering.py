"""The client runs on camera nodes without PyTorch: nothing in client/ may pull it in. And its
modules import each other one way only: no cycle, not even through a deferred import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_client_imports_neither_torch_nor_build_engine() -> None:
    code = (
        "import sys, pkgutil, importlib, client\n"
        "for m in pkgutil.walk_packages(client.__path__, 'client.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'build_engine', 'server')]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of ``package`` it names in an import statement anywhere (top level
    or inside a function). Parent packages a dotted import runs implicitly are not edges: a
    package's ``__init__`` that re-exports its modules is not a cycle."""
    files = {_module_name(p, root): p for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    if sub in files:
                        edges.add(sub)
                    elif node.module in files:
                        edges.add(node.module)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_find_cycle_sees_a_deferred_import_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.base import X\n")
    (pkg / "base.py").write_text("X = 1\n\ndef f():\n    from pkg.reader import Y\n    return Y\n")
    (pkg / "reader.py").write_text("from pkg.base import X\n\nY = X\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.base", "pkg.reader", "pkg.base"]
    (pkg / "base.py").write_text("X = 1\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None


def test_client_has_no_import_cycle() -> None:
    graph = import_graph(REPO_ROOT, "client")
    assert "client.sources.registry" in graph and "client.resend_window" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
