"""Every command shown in deploy/README.md is checked against what it refers to.

Commands are the lines of fenced ``sh`` blocks (``\\`` continuations joined, ``&&`` split,
``sudo`` and leading ``VAR=value`` assignments peeled off) plus inline code spans that start
with a known command. Each goes to the checker for its program; a program without a checker
fails the test, so a new kind of command cannot slip in unchecked:

* ``perception SUB ...``: parsed by the sub-command's own ``build_parser()``;
* ``docker build``: ``--target`` is a stage, ``--build-arg`` a declared ARG,
  ``--build-context NAME=`` a stage it replaces, the context the repository root;
  ``docker run``: the image was built above, the arguments after it are appended to that
  stage's ENTRYPOINT and the whole is parsed by ``perception serve``'s parser, in the stage's
  ENV with the command's ``-e`` over it: the gRPC port the server binds is published;
  ``docker compose -f FILE``: the file exists;
* ``kubectl apply -f/-k``: the file or kustomization exists (and is validated by
  test_k8s.py); other ``kubectl`` verbs: the namespace and ``kind/name`` exist in deploy/k8s;
* ``systemctl`` / ``journalctl``: the unit is deploy/vehicle's; ``install``: the source
  exists and the destination is where the unit expects it; ``cp`` / ``mkdir``: sources exist
  or were produced by an earlier command;
* ``make``: the target exists in the Makefile; scripts and tools: the file exists.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.deploy.cli_check import REPO_ROOT, parse_perception_argv, serve_settings
from tests.deploy.dockerfile import parse_dockerfile

README = REPO_ROOT / "deploy" / "README.md"
UNIT = REPO_ROOT / "deploy" / "vehicle" / "perception.service"
K8S = REPO_ROOT / "deploy" / "k8s"


@dataclass
class Command:
    argv: list[str]
    line: int
    inline: bool

    def __str__(self) -> str:
        return f"README line {self.line}: {' '.join(self.argv)}"


@dataclass
class State:
    """What earlier commands produced: image tags, output paths."""

    images: dict[str, str] = field(default_factory=dict)  # tag -> Dockerfile stage
    produced: set[str] = field(default_factory=set)


def fenced_commands(text: str) -> list[Command]:
    out: list[Command] = []
    in_block = False
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if line.startswith("```"):
            lang = line[3:].strip()
            if not in_block and lang not in ("sh", "bash", "shell", "console"):
                raise AssertionError(f"README line {number}: fenced block must be ```sh (got {lang!r})")
            in_block = not in_block
            continue
        if not in_block:
            continue
        line = line.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.extend(_split(pending + line, start, inline=False))
        pending = ""
    assert not in_block, "unterminated fenced block"
    return out


def _split(text: str, line: int, inline: bool) -> list[Command]:
    tokens = shlex.split(text, comments=not inline)
    for bad in ("|", ";", "||", ">", "<"):
        assert bad not in tokens, f"README line {line}: keep commands simple (no {bad!r}): {text}"
    commands: list[list[str]] = []
    current: list[str] = []
    for token in tokens:
        if token == "&&":
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [Command(argv=c, line=line, inline=inline) for c in commands if c]


def inline_commands(text: str, programs: set[str]) -> list[Command]:
    out: list[Command] = []
    in_block = False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            continue
        for span in re.findall(r"`([^`]+)`", line):
            words = span.split()
            first = words[1] if words[:1] == ["sudo"] and len(words) > 1 else (words[0] if words else "")
            if first in programs and len(words) > 1:
                out.extend(_split(span, number, inline=True))
    return out


def _peel(argv: list[str]) -> list[str]:
    """Drop `sudo` and leading VAR=value assignments (which must be server settings)."""
    if argv[:1] == ["sudo"]:
        argv = argv[1:]
    from server.config import ENV_PREFIX, ServerConfig

    fields = {f"{ENV_PREFIX}{n.upper()}" for n in ServerConfig.__dataclass_fields__}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        assert argv[0].split("=")[0] in fields, f"{argv[0]} is not a server setting"
        argv = argv[1:]
    return argv


# --- checkers ---------------------------------------------------------------------------------


def check_perception(cmd: Command, argv: list[str], state: State) -> None:
    if cmd.inline and len(argv) == 2:  # prose naming a sub-command, e.g. `perception build`
        from perception.cli import commands

        COMMANDS = commands()

        assert argv[1] in COMMANDS, f"{cmd}: no sub-command {argv[1]}"
        return
    args = parse_perception_argv(["perception", *argv[1:]])
    out = getattr(args, "out", None)
    if out is not None:
        state.produced.add(str(out).rstrip("/"))


def _options(argv: list[str], with_value: set[str], flags: set[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Split docker-style options (``--x=v``, ``--x v``, ``-x v``) from positionals."""
    opts: list[tuple[str, str]] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if rest:  # everything after the first positional belongs to it (image args)
            rest.append(a)
        elif a.startswith("-") and "=" in a and a.split("=", 1)[0] in with_value:
            key, value = a.split("=", 1)
            opts.append((key, value))
        elif a in with_value:
            opts.append((a, argv[i + 1]))
            i += 1
        elif a in flags:
            opts.append((a, ""))
        elif a.startswith("-"):
            raise AssertionError(f"unknown option {a}")
        else:
            rest.append(a)
        i += 1
    return opts, rest


def check_docker(cmd: Command, argv: list[str], state: State) -> None:
    dockerfile = parse_dockerfile(REPO_ROOT / "Dockerfile")
    stages = [s.name for s in dockerfile.stages]
    sub = argv[1]
    if sub == "build":
        with_value = {"-t", "--tag", "--target", "--build-arg", "--build-context", "--platform", "-f"}
        opts, rest = _options(argv[2:], with_value, set())
        assert rest == ["."], f"{cmd}: build from the repository root (context '.')"
        target = stages[-1]
        for key, value in opts:
            if key == "--target":
                assert value in stages, f"{cmd}: no stage {value}"
                target = value
            elif key == "--build-arg":
                assert value.split("=")[0] in dockerfile.declared_args(), f"{cmd}: undeclared ARG {value}"
            elif key == "--build-context":
                assert value.split("=")[0] in stages, f"{cmd}: build context {value} replaces no stage"
            elif key == "--platform":
                assert re.fullmatch(r"linux/(amd64|arm64)", value)
        tags = [v for k, v in opts if k in ("-t", "--tag")]
        assert tags, f"{cmd}: tag the image (-t) so later commands can name it"
        for tag in tags:
            state.images[tag] = target
    elif sub == "run":
        opts, rest = _options(
            argv[2:],
            {"--name", "-p", "--publish", "-v", "--volume", "--tmpfs", "--gpus", "--runtime", "-e", "--env",
             "--group-add"},
            {"--rm", "-d", "--detach", "--read-only"},
        )
        assert rest, f"{cmd}: no image"
        image, extra = rest[0], rest[1:]
        assert image in state.images, f"{cmd}: image {image} is not built by an earlier command"
        stage = dockerfile.stage(state.images[image])
        entry = stage.of("ENTRYPOINT")[-1].exec_form()
        assert entry is not None
        env = stage.env()
        env.update(dict(v.split("=", 1) for k, v in opts if k in ("-e", "--env") and "=" in v))
        args = serve_settings([*entry, *extra], env)
        published = {int(v.split(":")[-1]) for k, v in opts if k in ("-p", "--publish")}
        assert args.port in published, f"{cmd}: the gRPC port {args.port} is not published"
        for key, value in opts:
            if key in ("-v", "--volume"):
                source, target = value.split(":")[:2]
                assert target.startswith("/")
                if target == "/cache":
                    assert env.get("PERCEPTION_ENGINE_CACHE_DIR") == "/cache", f"{cmd}: /cache is not the engine cache"
    elif sub == "compose":
        opts, rest = _options(argv[2:], {"-f", "--file"}, set())
        files = [v for k, v in opts if k in ("-f", "--file")]
        assert files and all((REPO_ROOT / f).is_file() for f in files), f"{cmd}: compose file missing"
        verbs = ("up", "down", "ps", "logs", "pull", "build", "restart")
        assert rest and rest[0] in verbs, f"{cmd}: unknown compose verb"
    else:
        raise AssertionError(f"{cmd}: no checker for `docker {sub}`")


def _k8s_resources() -> set[tuple[str, str, str]]:
    out = set()
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "metadata" in doc and doc.get("kind") != "Kustomization":
                out.add((doc["metadata"].get("namespace", ""), doc["kind"].lower(), doc["metadata"]["name"]))
    return out


KIND_ALIASES = {"deployment": "deployment", "deploy": "deployment", "service": "service", "svc": "service",
                "job": "job", "hpa": "horizontalpodautoscaler", "pdb": "poddisruptionbudget",
                "configmap": "configmap", "cm": "configmap", "pods": "pod", "pod": "pod"}


def check_kubectl(cmd: Command, argv: list[str], state: State) -> None:
    # kubectl takes options anywhere on the line.
    values: dict[str, str] = {}
    rest: list[str] = []
    tokens = iter(argv[1:])
    for token in tokens:
        if token in ("-n", "--namespace", "-f", "-k"):
            values[token] = next(tokens)
        elif token in ("-w", "--watch"):
            values[token] = ""
        elif token.startswith("-"):
            raise AssertionError(f"unknown option {token}")
        else:
            rest.append(token)
    if rest[:1] == ["apply"]:
        if "-k" in values:
            assert (REPO_ROOT / values["-k"] / "kustomization.yaml").is_file(), f"{cmd}: no kustomization"
        else:
            assert (REPO_ROOT / values["-f"]).is_file(), f"{cmd}: no such manifest"
        return
    namespace = values.get("-n", values.get("--namespace", ""))
    resources = _k8s_resources()
    assert namespace and any(r[0] == namespace for r in resources), f"{cmd}: unknown namespace {namespace!r}"
    verb, *targets = rest
    checked_verbs = ("get", "logs", "describe", "rollout", "port-forward", "delete")
    assert verb in checked_verbs, f"{cmd}: no checker for kubectl {verb}"
    if verb == "rollout":
        assert targets[0] == "status"
        targets = targets[1:]
    if verb == "port-forward":
        mapping = targets[1]
        assert re.fullmatch(r"\d+:\d+", mapping), f"{cmd}: ports"
        targets = targets[:1]
    if verb == "get" and len(targets) == 2 and "/" not in targets[0]:
        targets = [f"{targets[0]}/{targets[1]}"]
    for target in targets:
        if "/" not in target:
            assert target in KIND_ALIASES, f"{cmd}: unknown resource kind {target}"
            continue
        kind, name = target.split("/", 1)
        kind = KIND_ALIASES[kind]
        assert (namespace, kind, name) in resources, f"{cmd}: no {kind}/{name} in namespace {namespace} in deploy/k8s"


def _unit_name() -> str:
    return UNIT.name


def check_systemctl(cmd: Command, argv: list[str], state: State) -> None:
    verb, *units = [a for a in argv[1:] if not a.startswith("-")]
    assert verb in ("daemon-reload", "enable", "start", "stop", "restart", "reload", "status", "reset-failed",
                    "disable")
    if verb == "reload":
        assert "ExecReload=" in UNIT.read_text(), f"{cmd}: the unit has no ExecReload="
    if verb == "daemon-reload":
        assert not units
        return
    assert units == [_unit_name()], f"{cmd}: name the unit as installed: {_unit_name()}"


def check_journalctl(cmd: Command, argv: list[str], state: State) -> None:
    assert argv[argv.index("-u") + 1] == _unit_name(), f"{cmd}: unknown unit"


def check_install(cmd: Command, argv: list[str], state: State) -> None:
    opts, rest = _options(argv[1:], {"-m", "-o", "-g"}, {"-D", "-d"})
    values = dict(opts)
    assert re.fullmatch(r"0[0-7]{3}", values["-m"])
    if "-d" in values:  # a directory for the image's user (e.g. a host engine cache)
        users = {i.args for s in parse_dockerfile(REPO_ROOT / "Dockerfile").stages for i in s.of("USER")}
        assert f"{values['-o']}:{values['-g']}" in users, f"{cmd}: owner is not the images' USER {users}"
        assert all(p.startswith("/") for p in rest)
        return
    source, dest = rest
    assert (REPO_ROOT / source).is_file(), f"{cmd}: {source} is not in the repository"
    unit_text = UNIT.read_text()
    if source.endswith(".service"):
        assert dest == f"/etc/systemd/system/{Path(source).name}"
    elif source.endswith(".py"):  # a program the unit runs (the supervisor)
        assert f" {dest} " in unit_text, f"{cmd}: the unit does not run {dest}"
    else:
        assert f"EnvironmentFile={dest}" in unit_text, f"{cmd}: the unit does not read {dest}"


def check_cp(cmd: Command, argv: list[str], state: State) -> None:
    opts, rest = _options(argv[1:], set(), {"-r", "-a"})
    *sources, dest = rest
    unit_text = UNIT.read_text()
    env_file = REPO_ROOT / "deploy/vehicle/perception.env"
    for source in sources:
        assert (REPO_ROOT / source).exists() or source.rstrip("/") in state.produced, (
            f"{cmd}: {source} neither exists nor was produced"
        )
        placed = f"{dest.rstrip('/')}/{Path(source).name}"
        assert placed in unit_text or any(placed in line for line in env_file.read_text().splitlines()), (
            f"{cmd}: {placed} is not where the unit or its environment file look"
        )


def check_mkdir(cmd: Command, argv: list[str], state: State) -> None:
    assert all(a.startswith("/") for a in argv[1:] if not a.startswith("-"))


def check_make(cmd: Command, argv: list[str], state: State) -> None:
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO_ROOT / "Makefile").read_text(), re.M))
    assert set(argv[1:]) <= targets, f"{cmd}: no such Makefile target"


def check_install_script(cmd: Command, argv: list[str], state: State) -> None:
    script = REPO_ROOT / argv[0]
    assert script.is_file() and script.stat().st_mode & 0o111, f"{cmd}: not an executable script"
    assert argv[1].startswith("/"), f"{cmd}: PREFIX must be absolute"
    if len(argv) > 2:
        if sys.version_info >= (3, 11):
            import tomllib

            extras = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        else:  # tomllib is 3.11+ (the project supports 3.10): the installed metadata lists the same extras
            from importlib.metadata import metadata

            extras = set(metadata("perception").get_all("Provides-Extra") or [])
        assert set(argv[2].split(",")) <= extras, f"{cmd}: unknown extras"
    assert f"{argv[1]}/venv/bin/perception" in UNIT.read_text(), f"{cmd}: the unit runs a different install"


def check_path_argument(cmd: Command, argv: list[str], state: State) -> None:
    """Tools whose argument is a repository file or directory (hadolint, systemd-analyze, pytest)."""
    paths = [a for a in argv[1:] if not a.startswith("-") and a != "verify"]
    assert paths and all((REPO_ROOT / p).exists() for p in paths), f"{cmd}: {paths} not in the repository"


CHECKERS: dict[str, Callable[[Command, list[str], State], None]] = {
    "perception": check_perception,
    ".venv/bin/perception": check_perception,
    "/opt/perception/venv/bin/perception": check_perception,  # the vehicle install (deploy/vehicle/install.sh)
    "docker": check_docker,
    "kubectl": check_kubectl,
    "systemctl": check_systemctl,
    "journalctl": check_journalctl,
    "install": check_install,
    "cp": check_cp,
    "mkdir": check_mkdir,
    "make": check_make,
    "deploy/vehicle/install.sh": check_install_script,
    "hadolint": check_path_argument,
    "systemd-analyze": check_path_argument,
    ".venv/bin/pytest": check_path_argument,
}


def readme_commands() -> list[Command]:
    text = README.read_text()
    return fenced_commands(text) + inline_commands(text, set(CHECKERS) - {"cp", "mkdir", "install"})


def test_readme_has_commands_for_each_target() -> None:
    programs = {_peel(c.argv)[0] for c in readme_commands()}
    assert {"systemctl", "docker", "kubectl", "perception"} <= programs


def test_every_readme_command_is_known_and_valid() -> None:
    state = State()
    fenced = [c for c in readme_commands() if not c.inline]
    inline = [c for c in readme_commands() if c.inline]
    checked = 0
    for cmd in fenced + inline:  # fenced first: they build the images the inline ones may name
        argv = _peel(cmd.argv)
        checker = CHECKERS.get(argv[0])
        assert checker is not None, f"{cmd}: no checker for `{argv[0]}`; add one to tests/deploy/test_readme.py"
        try:
            checker(cmd, argv, state)
        except (AssertionError, IndexError, KeyError, ValueError) as exc:
            raise AssertionError(f"{cmd}: {exc}") from exc
        checked += 1
    assert checked >= 25


@pytest.mark.parametrize(
    "bad",
    [
        "perception serve --modle x",
        "docker build --target runtime-cuda -t x .",
        "docker build --build-arg NO_SUCH_ARG=1 -t x .",
        "kubectl -n perception rollout status deployment/perceptron",
        "sudo systemctl enable --now perception",
        "kubectl apply -f deploy/k8s/nope.yaml",
        "curl http://127.0.0.1:9100/metrics",
    ],
)
def test_checkers_reject_wrong_commands(bad: str) -> None:
    """The checks can fail: typos in flags, stages, args, resources and units are caught."""
    cmd = _split(bad, 0, inline=False)[0]
    argv = _peel(cmd.argv)
    checker = CHECKERS.get(argv[0])
    if checker is None:
        return  # an unknown program is rejected by test_every_readme_command_is_known_and_valid
    with pytest.raises((AssertionError, KeyError)):
        checker(cmd, argv, State())


def test_jetson_container_reaches_the_gpu_and_its_cuda_runtime() -> None:
    """The Jetson image runs as user 10001: without the `video` group it cannot open the GPU
    device nodes (the vehicle unit has SupplementaryGroups=video), and without the `jetson`
    extra the TensorRT backend has no cuda-python."""
    jetson_tags = set()
    runs = 0
    for cmd in fenced_commands(README.read_text()):
        argv = _peel(cmd.argv)
        if argv[:2] == ["docker", "build"] and any("l4t" in a for a in argv):
            extras = next(a.split("=", 1)[1] for a in argv if a.startswith("RUNTIME_EXTRAS="))
            assert "jetson" in extras.split(","), f"{cmd}: the jetson extra is missing"
            jetson_tags.add(argv[argv.index("-t") + 1])
        elif argv[:2] == ["docker", "run"] and jetson_tags & set(argv):
            assert "video" in [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--group-add"], f"{cmd}"
            runs += 1
    assert jetson_tags and runs
    assert "SupplementaryGroups=video" in UNIT.read_text()
