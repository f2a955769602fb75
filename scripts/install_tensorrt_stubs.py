#!/usr/bin/env python3
"""Install NVIDIA TensorRT's type stubs into this interpreter's environment, and repair them.

Why: TensorRT itself only installs on machines with an NVIDIA driver, so on the CPU-only build
machines and CI mypy checks ``server/runtime/tensorrt_*.py`` against the ``tensorrt-stubs``
package instead. That package depends on ``tensorrt-cu12-bindings`` (the real, GPU-only
library), so it is installed with ``--no-deps``.

The stubs were generated from TensorRT's pybind11 signatures, and version 10.13.0.35.1 ships
files that mypy cannot use as they are:

1. ``tensorrt_bindings/tensorrt.pyi`` has five syntax errors, each a C++ signature that pybind11
   accepts but Python's grammar does not. mypy stops on the first one, so nothing is checked.

   - ``INetworkDefinition.add_scale_nd(input, mode, shift=None, scale=None, power=None,
     channel_axis)``: a required parameter after defaulted ones. pybind11 accepts all six
     positionally, or ``channel_axis`` by keyword with the weights left out; two overloads
     say exactly that.
   - ``IPluginV2DynamicExt.get_workspace_size``, ``IPluginV3OneBuild.configure_plugin``,
     ``IPluginV3OneBuild.get_workspace_size`` and ``IPluginV3OneRuntime.on_shape_change``
     name a parameter ``in``, a Python keyword. No caller can pass ``in=`` anyway, so it
     becomes the positional-only ``in_``; ``out`` stays passable by keyword.

2. The wheel puts its stubs in the ``tensorrt`` and ``tensorrt_bindings`` packages without a
   ``py.typed`` marker (only its own ``tensorrt_stubs`` package has one), so mypy skips them
   ("module is installed, but missing library stubs or py.typed marker"). The repair adds the
   markers and lists them in the wheel's RECORD, so ``pip uninstall tensorrt-stubs`` takes them too.

Idempotent and fast when done: an installed, repaired copy of the pinned version is left alone.
A stub layout this script does not know (another version) fails loudly instead of half-patching.

Usage (``make lint`` runs it): .venv/bin/python scripts/install_tensorrt_stubs.py
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

DIST = "tensorrt-stubs"
VERSION = "10.13.0.35.1"  # the TensorRT 10.13 API; the patches below are for this file exactly
BINDINGS = "tensorrt_bindings/tensorrt.pyi"
UNTYPED_PACKAGES = ("tensorrt", "tensorrt_bindings")  # stub packages shipped without py.typed
# The grammar the stubs must parse under: the project's oldest Python (requires-python).
MIN_PYTHON = (3, 10)


@dataclass(frozen=True)
class Patch:
    """Replace one broken stub line ``old`` (matched whole, indentation included) by ``new``."""

    why: str
    old: str
    new: str


_ADD_SCALE_ND_WEIGHTS = "input: ITensor, mode: ScaleMode, shift: Weights | None"
PATCHES = (
    Patch(
        why="INetworkDefinition.add_scale_nd: required channel_axis after defaulted weights",
        old=(
            "    def add_scale_nd(self, input: ITensor, mode: ScaleMode, shift: Weights = None, scale: Weights = None,"
            " power: Weights = None, channel_axis: int) -> IScaleLayer:"
        ),
        new=(
            "    @typing.overload\n"
            f"    def add_scale_nd(self, {_ADD_SCALE_ND_WEIGHTS}, scale: Weights | None, power: Weights | None,"
            " channel_axis: int) -> IScaleLayer:\n"
            "        ...\n"
            "    @typing.overload\n"
            f"    def add_scale_nd(self, {_ADD_SCALE_ND_WEIGHTS} = None, scale: Weights | None = None,"
            " power: Weights | None = None, *, channel_axis: int) -> IScaleLayer:"
        ),
    ),
    Patch(
        why="IPluginV2DynamicExt.get_workspace_size: parameter named `in`",
        old="    def get_workspace_size(self, in: list[PluginTensorDesc], out: list[PluginTensorDesc]) -> int:",
        new="    def get_workspace_size(self, in_: list[PluginTensorDesc], /, out: list[PluginTensorDesc]) -> int:",
    ),
    Patch(
        why="IPluginV3OneBuild.configure_plugin: parameter named `in`",
        old=(
            "    def configure_plugin(self: IPluginV3, in: list[DynamicPluginTensorDesc],"
            " out: list[DynamicPluginTensorDesc]) -> None:"
        ),
        new=(
            "    def configure_plugin(self: IPluginV3, in_: list[DynamicPluginTensorDesc], /,"
            " out: list[DynamicPluginTensorDesc]) -> None:"
        ),
    ),
    Patch(
        why="IPluginV3OneBuild.get_workspace_size: parameter named `in`",
        old=(
            "    def get_workspace_size(self: IPluginV3, in: list[DynamicPluginTensorDesc],"
            " out: list[DynamicPluginTensorDesc]) -> int:"
        ),
        new=(
            "    def get_workspace_size(self: IPluginV3, in_: list[DynamicPluginTensorDesc], /,"
            " out: list[DynamicPluginTensorDesc]) -> int:"
        ),
    ),
    Patch(
        why="IPluginV3OneRuntime.on_shape_change: parameter named `in`",
        old=(
            "    def on_shape_change(self: IPluginV3, in: list[PluginTensorDesc],"
            " out: list[PluginTensorDesc]) -> None:"
        ),
        new=(
            "    def on_shape_change(self: IPluginV3, in_: list[PluginTensorDesc], /,"
            " out: list[PluginTensorDesc]) -> None:"
        ),
    ),
)


class StubError(RuntimeError):
    """The installed stubs are not the layout this script knows how to repair."""


def installed_version() -> str | None:
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        return None


def install(force: bool) -> None:
    """``pip install --no-deps``: the dependency is the GPU-only TensorRT library itself."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{DIST}=={VERSION}"]
    subprocess.run(cmd + (["--force-reinstall"] if force else []), check=True)


def site_root() -> Path:
    """The directory the distribution's files are installed relative to (site-packages)."""
    return Path(str(metadata.distribution(DIST).locate_file("")))


def repair_lines(text: str) -> tuple[str, int]:
    """Apply every patch to ``text``; returns (new text, patches applied now).

    Each broken line must occur exactly once, or its replacement must already be there.
    """
    lines = text.split("\n")
    applied = 0
    for patch in PATCHES:
        hits = [i for i, line in enumerate(lines) if line == patch.old]
        if len(hits) == 1:
            lines[hits[0]] = patch.new
            applied += 1
        elif not hits and patch.new in text:
            continue  # repaired on an earlier run
        else:
            raise StubError(f"{BINDINGS}: expected the broken line once ({patch.why}), found it {len(hits)} times")
    return "\n".join(lines), applied


def check_syntax(root: Path) -> None:
    """Every stub file of the distribution parses under the project's oldest Python grammar."""
    files = metadata.files(DIST) or []
    for f in files:
        if f.suffix == ".pyi":
            path = root / f
            try:
                ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=MIN_PYTHON)
            except SyntaxError as exc:
                raise StubError(f"{path}:{exc.lineno}: still not valid Python: {exc.msg}") from exc


def repair(root: Path) -> list[str]:
    """Patch the syntax errors and add the py.typed markers; returns what was changed."""
    changed = []
    stub = root / BINDINGS
    text = stub.read_text(encoding="utf-8")
    new_text, applied = repair_lines(text)
    if applied:
        stub.write_text(new_text, encoding="utf-8")
        changed.append(f"{BINDINGS}: {applied} signature(s)")
    for pkg in UNTYPED_PACKAGES:
        marker = root / pkg / "py.typed"
        if not marker.is_file():
            marker.write_text("")  # empty: the stubs are complete, not partial
            _record(root, f"{pkg}/py.typed")
            changed.append(f"{pkg}/py.typed")
    check_syntax(root)
    return changed


def _record(root: Path, relpath: str) -> None:
    """List an added file in the distribution's RECORD, so ``pip uninstall`` removes it too."""
    record = next((root / f for f in metadata.files(DIST) or [] if f.name == "RECORD"), None)
    if record is None or not record.is_file():
        return
    text = record.read_text(encoding="utf-8")
    if not any(line.split(",", 1)[0] == relpath for line in text.splitlines()):
        record.write_text(text + ("" if text.endswith("\n") else "\n") + f"{relpath},,\n", encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help=f"reinstall {DIST} {VERSION} before repairing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.force or installed_version() != VERSION:
            install(args.force)
        changed = repair(site_root())
    except (StubError, OSError, subprocess.CalledProcessError) as exc:
        print(f"install_tensorrt_stubs: {exc}", file=sys.stderr)
        return 1
    print(f"{DIST} {VERSION}: " + (", ".join(f"repaired {c}" for c in changed) if changed else "already repaired"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
