"""Check a `perception ...` command line from a deploy file against the real CLI parsers.

Every place the deploy files spell a command (the Dockerfile's ENTRYPOINT and HEALTHCHECK,
the systemd unit's ExecStart, the compose command, the Kubernetes Job, deploy/README.md)
goes through :func:`check_perception_argv`, which imports the sub-command's module from
``perception.cli.COMMANDS`` and runs its own ``build_parser().parse_args`` on the arguments:
a renamed or removed flag fails the deploy tests, not a vehicle.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
from pathlib import Path

import pytest

from perception.cli import commands

COMMANDS = commands()

REPO_ROOT = Path(__file__).resolve().parents[2]


def module_written(module_name: str) -> bool:
    """Whether the sub-command's module exists in this tree (sub-commands land in parallel)."""
    return importlib.util.find_spec(module_name) is not None


def parse_perception_argv(argv: list[str]) -> argparse.Namespace:
    """Parse ``["perception", sub, *args]`` with the sub-command's real parser.

    Raises AssertionError naming the command when the parser rejects it; skips the calling
    test (with the module's name) when that sub-command has not been written yet.
    """
    if not argv or Path(argv[0]).name != "perception":
        raise AssertionError(f"not a perception command: {argv}")
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise AssertionError(f"unknown perception sub-command in {argv}; known: {sorted(COMMANDS)}")
    module_name = COMMANDS[argv[1]].module
    if not module_written(module_name):
        pytest.skip(f"{module_name} is not in this tree yet; cannot check {' '.join(argv)}")
    module = importlib.import_module(module_name)
    parser = module.build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv[2:])
    except SystemExit as exc:
        raise AssertionError(f"`{' '.join(argv)}` is rejected by {module_name}: {err.getvalue().strip()}") from exc
