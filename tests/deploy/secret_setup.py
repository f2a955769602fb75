"""The "Secrets" section of deploy/README.md, read as data: its indented shell blocks, the block
that creates the secrets, and where the others place each file.

deploy/README.md keeps these commands in indented blocks, not ```sh fences: test_readme.py
parses every fenced command and has no checker for openssl or systemd-creds. test_secrets.py
runs the creation block for real and checks every placement against the target's config.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tests.deploy.cli_check import REPO_ROOT

README = REPO_ROOT / "deploy" / "README.md"
CREATED_IN = "deploy/secrets"  # where the creation block writes, relative to the repository root


def secrets_section(text: str | None = None) -> str:
    text = README.read_text() if text is None else text
    start = text.index("\n## Secrets\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def indented_blocks(text: str) -> list[str]:
    """Markdown indented code blocks (4 or more spaces, inside list items too), dedented."""
    blocks: list[str] = []
    current: list[str] = []
    indent = 0
    previous_blank = True
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        depth = len(line) - len(stripped)
        if current:
            if stripped and depth >= indent:
                current.append(line[indent:])
                previous_blank = False
                continue
            blocks.append("\n".join(current))
            current = []
        if stripped and depth >= 4 and previous_blank:
            indent = depth
            current = [line[indent:]]
        previous_blank = not stripped
    if current:
        blocks.append("\n".join(current))
    return blocks


def creation_block(text: str | None = None) -> str:
    """The one block that makes the CA, the server key and certificate and the token."""
    found = [b for b in indented_blocks(secrets_section(text)) if "openssl rand" in b]
    assert len(found) == 1, f"expected one block creating the secrets (openssl rand), found {len(found)}"
    return found[0]


def commands(block: str) -> list[list[str]]:
    """The block's command lines, `\\` continuations joined, `sudo` dropped, split like a shell."""
    out: list[list[str]] = []
    pending = ""
    for raw in block.splitlines():
        line = raw.strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        argv = shlex.split(pending + line, comments=True)
        pending = ""
        if argv[:1] == ["sudo"]:
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


@dataclass(frozen=True)
class Placement:
    """One file the README puts where a target loads it from."""

    source: str  # as written, e.g. deploy/secrets/tls.key
    dest: str  # the file it becomes, e.g. /etc/credstore/perception.tls.key
    mode: str  # install -m, "" for cp
    tool: str  # install, cp, systemd-creds
    credential_name: str = ""  # systemd-creds encrypt --name=

    @property
    def name(self) -> str:
        return PurePosixPath(self.source).name


def placements(text: str | None = None) -> list[Placement]:
    out: list[Placement] = []
    for block in indented_blocks(secrets_section(text)):
        for argv in commands(block):
            if argv[0] == "install" and "-d" not in argv:
                mode = argv[argv.index("-m") + 1] if "-m" in argv else ""
                files = [a for i, a in enumerate(argv[1:], 1) if not a.startswith("-") and argv[i - 1] != "-m"]
                *sources, dest = files
                out.extend(Placement(s, _into(dest, s, len(sources)), mode, "install") for s in sources)
            elif argv[0] == "cp":
                *sources, dest = [a for a in argv[1:] if not a.startswith("-")]
                out.extend(Placement(s, _into(dest, s, len(sources)), "", "cp") for s in sources)
            elif argv[:2] == ["systemd-creds", "encrypt"]:
                name = next(a.split("=", 1)[1] for a in argv if a.startswith("--name="))
                source, dest = [a for a in argv[2:] if not a.startswith("-")]
                out.append(Placement(source, dest, "", "systemd-creds", credential_name=name))
    return out


def _into(dest: str, source: str, n_sources: int) -> str:
    if dest.endswith("/") or n_sources > 1:
        return f"{dest.rstrip('/')}/{PurePosixPath(source).name}"
    return dest


def placed_at(dest: str | Path, text: str | None = None) -> Placement | None:
    """The README's placement that produces ``dest`` (a path on the target, or in the repository)."""
    key = str(dest)
    for placement in placements(text):
        target = placement.dest if placement.dest.startswith("/") else str(REPO_ROOT / placement.dest)
        if target == key:
            return placement
    return None


def create_secrets(root: Path) -> Path:
    """Run the creation block as it stands, from ``root`` as the repository root; returns the
    directory it wrote (``root / CREATED_IN``)."""
    result = subprocess.run(["bash", "-e", "-c", creation_block()], cwd=root, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"deploy/README.md's creation block failed: {result.stderr}"
    return root / CREATED_IN
