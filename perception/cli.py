"""The one CLI, ``perception``. Each sub-command lives in its component and is imported only
when it runs, so ``perception serve`` works on a vehicle image that has no PyTorch.

A sub-command module exposes ``main(argv: list[str]) -> int`` (and its own ``build_parser()``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys
from dataclasses import dataclass
from typing import TextIO

OUR_PACKAGES = ("perception", "build_engine", "server", "client")
# The entry-point group through which the upper layers register their sub-commands: the
# kernel names none of them (``pyproject.toml`` lists each layer's table).
ENTRY_POINT_GROUP = "perception.commands"


@dataclass(frozen=True)
class Command:
    """A sub-command: the module that implements it (imported only when it runs) and its help.

    ``order`` places it in ``--help`` (build stage first, then serving, then the client)."""

    name: str
    module: str
    help: str
    order: int = 0


def commands() -> dict[str, Command]:
    """Every registered sub-command, in ``--help`` order."""
    found: list[Command] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            table = ep.load()
        except ImportError:
            # That layer is not on this image (a vehicle's runtime image has no build stage).
            continue
        found += list(table)
    return {c.name: c for c in sorted(found, key=lambda c: (c.order, c.name))}


def add_progress_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The one ``--no-progress`` flag: every sub-command that shows progress takes it."""
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress output (default: shown when stderr is a terminal, off otherwise)")


def show_progress(no_progress: bool, stream: TextIO | None = None) -> bool:
    """Progress bars and step lines go to a terminal only: a log file or a pipe gets none."""
    out = sys.stderr if stream is None else stream
    return not no_progress and out.isatty()


def _usage(table: dict[str, Command]) -> str:
    width = max((len(n) for n in table), default=8)
    lines = ["usage: perception <command> [options]", "", "commands:"]
    lines += [f"  {c.name:<{width}}  {c.help}" for c in table.values()]
    if not table:
        lines.append("  (none registered: install the package, e.g. pip install -e '.[server,client]')")
    lines += ["", "Run `perception <command> --help` for a command's options. --debug shows tracebacks."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    table = commands()
    if not args or args[0] in ("-h", "--help"):
        print(_usage(table))
        return 0 if args else 2
    if args[0] == "--version":
        from perception import __version__

        print(__version__)
        return 0
    name, rest = args[0], args[1:]
    if name not in table:
        print(f"perception: unknown command {name!r}\n\n{_usage(table)}", file=sys.stderr)
        return 2
    # Our packages log at INFO; third-party libraries only warnings (onnxruntime's quantizer
    # logs a line per tensor on the root logger) unless --debug.
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG if debug else logging.INFO)
    module_name = table[name].module
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        print(
            f"perception {name}: needs the missing package {exc.name!r}; "
            f"install the matching extra (e.g. pip install 'perception[build]')",
            file=sys.stderr,
        )
        if debug:
            raise
        return 2
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one-line errors for users; the traceback only with --debug
        if debug:
            raise
        print(f"perception {name}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
