"""A small Dockerfile reader for the deploy tests: stages and their instructions.

Handles what the repository's Dockerfile uses: comments, parser directives, ``\\`` line
continuations, ``FROM [--platform=...] IMAGE [AS name]``, exec-form JSON arrays. It does not
evaluate anything; the tests decide what an instruction means.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: RUN, COPY, ENV, ...
    args: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line where it starts

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (ENTRYPOINT ["a", "b"]), else None."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"line {self.line}: exec form must be a JSON array of strings")
        return value


@dataclass
class Stage:
    name: str
    base: str
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """The variables the stage's ENV instructions set, as written (``$PATH`` unexpanded)."""
        out: dict[str, str] = {}
        for ins in self.of("ENV"):
            out.update(parse_env(ins.args))
        return out


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")

    def declared_args(self) -> set[str]:
        names = set(self.global_args)
        for stage in self.stages:
            for ins in stage.of("ARG"):
                names.add(ins.args.split("=", 1)[0].strip())
        return names


def _logical_lines(text: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") and not buf:
            continue  # comment or parser directive
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction is dropped by Docker too
        if not stripped and not buf:
            continue
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].rstrip())
            continue
        buf.append(stripped)
        out.append((start, " ".join(part for part in buf if part)))
        buf = []
    if buf:
        raise ValueError(f"line {start}: instruction ends with a line continuation")
    return out


def parse_env(args: str) -> dict[str, str]:
    """``ENV A=1 B="x y"`` (the key=value form) -> {"A": "1", "B": "x y"}."""
    out: dict[str, str] = {}
    for token in shlex.split(args, posix=True):
        if "=" not in token:
            raise ValueError(f"ENV {args!r}: use the KEY=value form")
        key, value = token.split("=", 1)
        out[key] = value
    return out


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in _logical_lines(path.read_text()):
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            base = words[0]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=base, line=line))
            continue
        if not stages:
            if keyword != "ARG":
                raise ValueError(f"line {line}: only ARG may come before the first FROM, got {keyword}")
            key, _, default = rest.partition("=")
            global_args[key.strip()] = default.strip()
            continue
        stages[-1].instructions.append(Instruction(keyword=keyword, args=rest, line=line))
    return Dockerfile(global_args=global_args, stages=stages)


def dockerignore_patterns(path: Path) -> list[str]:
    patterns = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if any(p.startswith("!") for p in patterns):
        raise ValueError("`!` patterns in .dockerignore: extend ignored() first")
    return patterns


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics for the patterns this repository uses (no ``!``):
    a pattern matches a path or any of its parent directories; ``**/x`` matches x at any depth."""
    parts = path.strip("/").split("/")
    for pattern in patterns:
        pat = pattern.rstrip("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if fnmatch.fnmatchcase(prefix, pat):
                return True
            if pat.startswith("**/") and fnmatch.fnmatchcase(parts[depth - 1], pat[3:]):
                return True
    return False


def healthcheck_exec(instruction: Instruction) -> list[str]:
    """The exec-form array after a HEALTHCHECK's ``CMD``."""
    assert instruction.keyword == "HEALTHCHECK"
    command = instruction.args.partition("CMD")[2].strip()
    argv = Instruction("CMD", command, instruction.line).exec_form()
    if argv is None:
        raise ValueError(f"line {instruction.line}: HEALTHCHECK CMD must use the exec form")
    return argv


_ECHO_ARGV = "#!/bin/sh\nexec \"$ECHO_PYTHON\" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n"


def healthcheck_argv(instruction: Instruction, env: Mapping[str, str] | None = None) -> list[str]:
    """The ``perception ...`` command line a HEALTHCHECK runs in a container whose environment
    is ``env``: a ``/bin/sh -c`` script is run for real with a ``perception`` on PATH that
    only prints its arguments, so the shell's expansions are what is checked (the container's
    own PATH, if ``env`` has one, gives way to the stub's)."""
    argv = healthcheck_exec(instruction)
    if argv[:2] != ["/bin/sh", "-c"]:
        return argv
    with tempfile.TemporaryDirectory() as tmp:
        stub = Path(tmp) / "perception"
        stub.write_text(_ECHO_ARGV)
        stub.chmod(0o755)
        run_env = {**(env or {}), "PATH": f"{tmp}{os.pathsep}{os.environ.get('PATH', '')}",
                   "ECHO_PYTHON": sys.executable}
        result = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=30, check=True)
    return ["perception", *json.loads(result.stdout)]
