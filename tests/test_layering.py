"""The dependency rules, enforced on the source (deferred imports inside functions included):

- the kernel (``perception``) imports nothing above it, not even by naming a module in a string;
- the server and the client never import torch or ``build_engine`` (a vehicle image has no PyTorch);
- ``build_engine`` does not speak gRPC and imports of the server only ``server.runtime``;
- no two of our modules import each other, directly or round a longer cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("perception", "build_engine", "server", "client")

FORBIDDEN = {
    "perception": {"torch", "build_engine", "server", "client", "grpc", "onnxruntime"},
    "server": {"torch", "build_engine", "client", "torch_pruning"},
    "client": {"torch", "build_engine", "server", "onnxruntime"},
    "build_engine": {"grpc", "client"},
}


def sources(package: str) -> list[Path]:
    return [p for p in (ROOT / package).rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (absolute names; relative resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from pkg import module`
    return out


def _ours() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sources(pkg)}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_layering(package: str) -> None:
    files = sources(package)
    assert files, f"no sources found in {package}/"
    offenders = {}
    for p in files:
        roots = {m.split(".")[0] for m in imported_modules(p)}
        bad = roots & FORBIDDEN[package]
        if bad:
            offenders[str(p.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"{package}/ imports what it must not: {offenders}"


def test_build_engine_uses_only_the_server_runtime() -> None:
    offenders = {}
    for p in sources("build_engine"):
        bad = sorted(m for m in imported_modules(p) if m.split(".")[0] == "server"
                     and not (m == "server" or m.startswith("server.runtime")))
        if bad:
            offenders[str(p.relative_to(ROOT))] = bad
    assert not offenders, f"build_engine/ imports server modules other than server.runtime: {offenders}"


_UPPER_MODULE = re.compile(r"\b(build_engine|server|client)\.[a-z_]+")


def test_kernel_names_no_upper_module_in_a_string() -> None:
    """Naming a module in a string (for importlib) is an import too: the kernel's CLI finds the
    sub-commands through entry points the upper layers register."""
    offenders = {}
    for p in sources("perception"):
        tree = ast.parse(p.read_text(), filename=str(p))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        hits = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                and id(n) not in docstrings and _UPPER_MODULE.search(n.value)]
        if hits:
            offenders[str(p.relative_to(ROOT))] = hits
    assert not offenders, f"the kernel names upper-layer modules: {offenders}"


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_find_cycles_finds_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    ours = _ours()
    graph = {m: {d for d in imported_modules(p) if d in ours and d != m} for m, p in ours.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle of design.
    for m in graph:
        graph[m] = {d for d in graph[m] if not (ours[m].name == "__init__.py" and d.startswith(m + "."))}
    cycles = find_cycles(graph)
    assert not cycles, f"import cycles (deferred imports included): {cycles}"
