"""The one CLI: every registered sub-command exists, parses --help, and fails in one line."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from perception.cli import commands, main

COMMANDS = commands()
EXPECTED = {"gen-data", "lint-labels", "train", "eval", "profile", "prune", "build", "serve", "verify-engine", "health",
            "replay", "compare"}


def test_every_layer_registers_its_commands() -> None:
    """The kernel names no command; the three layers' entry points bring them all."""
    assert set(COMMANDS) >= EXPECTED
    assert {c.module.split(".")[0] for c in COMMANDS.values()} == {"build_engine", "server", "client"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_subcommand_has_a_parser_and_main(name: str) -> None:
    module = importlib.import_module(COMMANDS[name].module)
    assert callable(module.main)
    parser = module.build_parser()
    assert parser.format_help().strip()


def test_usage_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_user_errors_are_one_line_without_traceback(tmp_path) -> None:
    missing = tmp_path / "nope" / "manifest.json"
    proc = subprocess.run(
        [sys.executable, "-m", "perception.cli", "serve", "--model", str(missing),
         "--port", "0", "--metrics-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "no such manifest" in proc.stderr
