"""The one CLI, ``perception``. Each sub-command lives in its component and is imported only
when it runs, so ``perception serve`` works on a vehicle image that has no PyTorch.

A sub-command module exposes ``main(argv: list[str]) -> int`` (and its own ``build_parser()``).
"""

from __future__ import annotations

import importlib
import logging
import sys

OUR_PACKAGES = ("perception", "build_engine", "server", "client")

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "gen-data": ("build_engine.datagen_cli", "generate a labelled road-scene dataset or a recorded drive"),
    "lint-labels": ("build_engine.lint_cli", "find geometric and model-assisted label mistakes"),
    "train": ("build_engine.train_cli", "train a detector from a config file"),
    "eval": ("build_engine.eval_cli", "score detections against COCO ground truth (P, R, PR curve, mAP)"),
    "profile": ("build_engine.profile_cli", "count MACs and params per layer"),
    "prune": ("build_engine.prune_cli", "structured channel / block pruning with fine-tuning"),
    "build": ("build_engine.build_cli", "fold BN, export ONNX, quantize, build engines, gate, write the manifest"),
    "serve": ("server.cli", "serve a manifest's engine over gRPC"),
    "verify-engine": ("server.verify_cli", "check an engine against the ONNX model on this device"),
    "health": ("server.health_cli", "ask a server's gRPC health service whether it is SERVING"),
    "replay": ("client.replay_cli", "replay a recorded drive against a server"),
    "compare": ("client.compare_cli", "diff two replays of the same drive, frame by frame, with KPI side by side"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: perception <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `perception <command> --help` for a command's options. --debug shows tracebacks."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from perception import __version__

        print(__version__)
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"perception: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # Our packages log at INFO; third-party libraries only warnings (onnxruntime's quantizer
    # logs a line per tensor on the root logger) unless --debug.
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG if debug else logging.INFO)
    module_name = COMMANDS[name][0]
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
