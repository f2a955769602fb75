"""The client runs on camera nodes without PyTorch: nothing in client/ may pull it in."""

from __future__ import annotations

import subprocess
import sys

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
