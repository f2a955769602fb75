"""The one CLI: every registered sub-command exists, parses --help, and fails in one line."""

from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys

import pytest

from perception.cli import commands, main, show_progress

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


# -- one convention across sub-commands ------------------------------------------------------

def _parser(name: str) -> argparse.ArgumentParser:
    return importlib.import_module(COMMANDS[name].module).build_parser()


def _visible_options(name: str) -> dict[str, argparse.Action]:
    """Option string -> action, for the options a user sees in --help."""
    return {s: a for a in _parser(name)._actions if a.help != argparse.SUPPRESS for s in a.option_strings}


# Every sub-command that shows progress (a bar or step lines on stderr).
SHOWS_PROGRESS = {"gen-data", "train", "eval", "prune", "build", "import", "design", "replay"}
# Every sub-command that talks to a running server.
TALKS_TO_A_SERVER = {"health", "replay", "camera"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_has_help(name: str) -> None:
    missing = [a.option_strings or a.dest for a in _parser(name)._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, f"perception {name}: flags without help: {missing}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_json_prints_to_stdout_and_files_are_out_or_json_out(name: str) -> None:
    opts = _visible_options(name)
    if "--json" in opts:  # a switch: JSON on stdout instead of the table; a file is --json-out / --out
        assert opts["--json"].nargs == 0, f"perception {name} --json takes a value"
    for flag in ("--json-out", "--out"):
        if flag in opts:
            assert opts[flag].nargs is None, f"perception {name} {flag} must take one path"
    assert not {"--summary-json", "--address", "--progress"} & set(opts), "old names are hidden aliases only"


@pytest.mark.parametrize("name", sorted(SHOWS_PROGRESS))
def test_progress_can_be_turned_off_everywhere(name: str) -> None:
    assert "--no-progress" in _visible_options(name)


@pytest.mark.parametrize("name", sorted(TALKS_TO_A_SERVER))
def test_the_server_address_is_server_everywhere(name: str) -> None:
    assert "--server" in _visible_options(name)


def test_progress_is_shown_on_a_terminal_only() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert show_progress(False, Tty()) and not show_progress(True, Tty())
    assert not show_progress(False, io.StringIO()), "a pipe or a log file gets no progress"


def test_old_flag_names_still_work() -> None:
    health = _parser("health").parse_args(["--address", "127.0.0.1:1"])
    replay = _parser("replay").parse_args(["drive.mcap", "--server", "h:1", "--summary-json", "s.json"])
    assert health.server == "127.0.0.1:1" and str(replay.json_out) == "s.json"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["health"], "the following arguments are required: --server"),
        (["health", "--server", "127.0.0.1:1", "--timeout", "0.5"], "127.0.0.1:1: UNAVAILABLE"),
        (["eval"], "nothing to evaluate"),
        (["replay", "/nonexistent/drive.mcap", "--server", "127.0.0.1:1", "--connect-timeout", "0.5"], ""),
    ],
)
def test_one_error_format(argv: list[str], needle: str) -> None:
    """Usage errors, user errors and failed checks all end in one line 'perception CMD: error: ...'."""
    proc = subprocess.run([sys.executable, "-m", "perception.cli", *argv], capture_output=True, text=True, timeout=60)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert last.startswith(f"perception {argv[0]}: error: ") and needle in last, proc.stderr


def test_replay_reads_a_url_as_a_url() -> None:
    args = _parser("replay").parse_args(["rtsp://cam.local:8554/front", "--server", "h:1"])
    assert args.source == "rtsp://cam.local:8554/front", "not a Path: a Path drops one of the two slashes"
