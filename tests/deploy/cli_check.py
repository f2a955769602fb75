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
import dataclasses
import importlib
import importlib.util
import io
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

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


def serve_settings(argv: list[str], env: Mapping[str, str]) -> SimpleNamespace:
    """The settings ``perception serve`` runs with, started as ``argv`` in the environment
    ``env`` (a container's: the image's ENV with what the deployment adds): the flags, parsed by
    the real parser, over the PERCEPTION_* variables over the defaults, merged by server.config
    itself. Not validated: the files the settings name are the container's."""
    from server.cli import _flags
    from server.config import ServerConfig, given_settings

    args = parse_perception_argv(argv)
    assert argv[1] == "serve", f"not a serve command: {argv}"
    defaults = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    return SimpleNamespace(**{**defaults, **given_settings(_flags(args), env=env)})


def env_beaten_by_flags(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """The PERCEPTION_* variables of ``env`` whose setting a flag of ``argv`` gives instead: a
    deployment that sets one of them changes nothing."""
    from server.cli import _flags
    from server.config import ENV_PREFIX, given_settings

    flagged = given_settings(_flags(parse_perception_argv(argv)), env={})
    return sorted(key for key in env if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in flagged)
