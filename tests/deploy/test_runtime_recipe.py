"""The runtime image's recipe, run for real without Docker.

The Dockerfile's `runtime` stage is replayed instruction by instruction into a temporary
directory: its COPY sources are copied from the repository (honouring .dockerignore, so
generated stubs in a developer's tree do not leak in), its ENV applied with the install
prefix moved into tmp, and its RUN lines executed with bash in a fresh virtual environment
(they call deploy/vehicle/install.sh, which creates it). Only RUN lines that change the host
itself (creating the service user) are skipped, and only those listed in OS_ONLY.

Then: `import torch` must fail there, `perception serve --help` and `perception health
--help` must work, and the image's own ENTRYPOINT, in the image's environment, must serve the
tiny model and answer the image's own HEALTHCHECK command. About 20 s on this machine (the
packages come from pip's local index / cache).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.cli_check import REPO_ROOT, module_written
from tests.deploy.dockerfile import dockerignore_patterns, healthcheck_exec, ignored, parse_dockerfile, parse_env
from tests.deploy.live_server import run_server

# RUN lines that only change the host's accounts: not meaningful (or safe) outside a container.
OS_ONLY = ("groupadd ", "useradd ")


def _copy_tree(src: Path, dst: Path, rel: str, patterns: list[str]) -> None:
    if src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        return
    for path in sorted(src.rglob("*")):
        path_rel = f"{rel}/{path.relative_to(src).as_posix()}"
        if ignored(path_rel, patterns) or path.is_dir():
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)


@dataclass(frozen=True)
class RuntimeImage:
    bin: Path  # the venv's bin directory
    env: dict[str, str]  # the stage's ENV (its paths moved into tmp) over this host's environment


@pytest.fixture(scope="module")
def runtime_install(tmp_path_factory: pytest.TempPathFactory) -> RuntimeImage:
    """Replay the runtime stage."""
    root = tmp_path_factory.mktemp("runtime_image")
    stage = parse_dockerfile(REPO_ROOT / "Dockerfile").stage("runtime")
    patterns = dockerignore_patterns(REPO_ROOT / ".dockerignore")
    prefix = root / "opt" / "perception"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERCEPTION_", "VIRTUAL_ENV", "PYTHON"))}
    # A venv's bin dir on PATH would make `python3` that venv's interpreter: drop them.
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "activate").exists())
    workdir: Path | None = None
    ran_install = False
    for ins in stage.instructions:
        if ins.keyword == "WORKDIR":
            workdir = root / ins.args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "ENV":
            for key, value in parse_env(ins.args).items():
                if key == "INSTALL_PREFIX":
                    env[key] = str(prefix)
                else:
                    env[key] = _expand(value.replace("/opt/perception", str(prefix)), env)
        elif ins.keyword == "COPY" and not ins.args.startswith("--from"):
            assert workdir is not None
            *sources, dest = ins.args.split()
            for source in sources:
                rel = source.rstrip("/")
                target = workdir / dest if len(sources) == 1 else workdir / dest / Path(rel).name
                _copy_tree(REPO_ROOT / rel, target, rel, patterns)
        elif ins.keyword == "RUN":
            if ins.args.startswith(OS_ONLY):
                continue
            assert workdir is not None
            assert not list(workdir.glob("perception/v1/*_pb2*.py")), "generated stubs leaked into the context"
            result = subprocess.run(
                ["bash", "-o", "pipefail", "-c", ins.args],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=540,
            )
            assert result.returncode == 0, (
                f"Dockerfile line {ins.line} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
            )
            ran_install |= "install.sh" in ins.args
            # install.sh builds in a copy: run with sudo in a checkout, stubs generated there
            # were root-owned files that a later `make setup` could not rewrite.
            assert not list(workdir.glob("perception/v1/*_pb2*.py")), "install.sh wrote into the source tree"
    assert ran_install, "the runtime stage no longer runs deploy/vehicle/install.sh"
    return RuntimeImage(prefix / "venv" / "bin", env)


def test_runtime_has_no_torch(runtime_install: RuntimeImage) -> None:
    # cwd=/ so the repository checkout is not on sys.path ('' = cwd for `python -c`).
    python = str(runtime_install.bin / "python")
    result = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, cwd="/")
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr
    for absent in ("build_engine", "grpc_tools"):
        result = subprocess.run([python, "-c", f"import {absent}"], capture_output=True, text=True, cwd="/")
        assert result.returncode != 0, f"{absent} is importable in the runtime environment"


def test_runtime_has_the_generated_contract(runtime_install: RuntimeImage) -> None:
    code = "import perception.v1.detector_pb2 as p, perception.v1.detector_pb2_grpc as g; print(p.__file__)"
    result = subprocess.run([str(runtime_install.bin / "python"), "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "site-packages" in result.stdout


@pytest.mark.parametrize("sub", ["serve", "health", "replay"])
def test_runtime_commands_work(runtime_install: RuntimeImage, sub: str) -> None:
    from perception.cli import commands

    COMMANDS = commands()
    if not module_written(COMMANDS[sub].module):
        pytest.skip(f"{COMMANDS[sub].module} is not in this tree yet")
    result = subprocess.run(
        [str(runtime_install.bin / "perception"), sub, "--help"], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_runtime_serves_and_answers_its_healthcheck(runtime_install: RuntimeImage, tiny_manifest: Path) -> None:
    """The image's own ENTRYPOINT and HEALTHCHECK commands, run from the fresh environment in
    the image's ENV, with the model and the ports changed as `docker run -e` or a Kubernetes
    ConfigMap changes them: the ENTRYPOINT's flags used to beat the environment, and the check
    asked 50051 whatever port the server bound."""
    if not (module_written("server.cli") and module_written("server.health_cli")):
        pytest.skip("server.cli / server.health_cli are not in this tree yet")
    stage = parse_dockerfile(REPO_ROOT / "Dockerfile").stage("runtime")
    entry = stage.of("ENTRYPOINT")[-1].exec_form()
    assert entry is not None
    health = healthcheck_exec(stage.of("HEALTHCHECK")[0])
    with socket.socket() as probe:  # a free port, set for the server and its check alike
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # As the container runs them: the image's PATH leads to the venv's `perception`.
    env = {**runtime_install.env, "PERCEPTION_MODEL": str(tiny_manifest), "PERCEPTION_HOST": "127.0.0.1",
           "PERCEPTION_PORT": str(port), "PERCEPTION_METRICS_HOST": "127.0.0.1", "PERCEPTION_METRICS_PORT": "0",
           "OMP_NUM_THREADS": "1"}
    with run_server(entry, env, cwd=Path("/")) as server:
        assert server.port == port
        ok = subprocess.run(health, capture_output=True, text=True, timeout=30, env=env)
        assert ok.returncode == 0, ok.stderr
        assert server.stop() == 0
    down = subprocess.run(health, capture_output=True, text=True, timeout=30, env=env)
    assert down.returncode != 0, "health must fail once the server is gone"


def test_install_script_refuses_to_run_outside_the_repo(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "deploy/vehicle/install.sh"), str(tmp_path / "p")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "run from the repository root" in result.stderr
    assert not (tmp_path / "p").exists(), "nothing is installed when the script refuses"


# A PYTHON for install.sh that stops it at its first pip call: it runs `-c` with the real
# interpreter, makes `-m venv DIR` a directory holding itself as DIR/bin/python, and as that
# venv's python reports what the install would build from (the umask, the copy's recorded
# commit) and fails.
_STOP_AT_PIP = """#!/bin/sh
case "$1" in
    -c) exec "$REAL_PYTHON" "$@" ;;
    -m) if [ "$2" = venv ]; then for last; do :; done; mkdir -p "$last/bin"; cp "$0" "$last/bin/python"; exit 0; fi ;;
esac
umask >"$RECORD/umask"
if [ -f server/build_info.json ]; then cp server/build_info.json "$RECORD/"; fi
exit 9
"""


def _install_until_pip(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    import sys

    stub = tmp_path / "python"
    stub.write_text(_STOP_AT_PIP)
    stub.chmod(0o755)
    record = tmp_path / "record"
    record.mkdir()
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("PERCEPTION_")}
    run_env.update(PYTHON=str(stub), REAL_PYTHON=sys.executable, RECORD=str(record), **env)
    # The caller's umask 077: what deploy/README.md's secrets block used to leave in the shell.
    result = subprocess.run(
        ["bash", "-c", 'umask 077; exec bash deploy/vehicle/install.sh "$0"', str(tmp_path / "prefix")],
        cwd=REPO_ROOT, env=run_env, capture_output=True, text=True, timeout=120,
    )
    return result, record


def test_install_script_installs_readable_files_whatever_the_callers_umask(tmp_path: Path) -> None:
    """The vehicle's service runs as a dynamic user: a venv made under the caller's umask 077
    would be unreadable to it."""
    result, record = _install_until_pip(tmp_path)
    assert result.returncode == 9, result.stderr  # stopped by the stub at the first pip call
    assert (record / "umask").read_text().strip() == "0022"


def test_install_script_records_the_commit_in_the_package(tmp_path: Path) -> None:
    """perception_build_info{git_sha}: the install builds from a copy without .git, so the
    commit is written into the package (server/build_info.json, read by server.metrics)."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          timeout=30, check=True).stdout.strip()
    result, record = _install_until_pip(tmp_path)
    assert result.returncode == 9, result.stderr
    assert json.loads((record / "build_info.json").read_text()) == {"git_sha": head}
    given = tmp_path / "given"
    given.mkdir()
    result, record = _install_until_pip(given, PERCEPTION_GIT_SHA="0123abc")
    assert result.returncode == 9, result.stderr
    assert json.loads((record / "build_info.json").read_text()) == {"git_sha": "0123abc"}
    bad = tmp_path / "bad"
    bad.mkdir()
    result, _ = _install_until_pip(bad, PERCEPTION_GIT_SHA='x", "evil": "1')
    assert result.returncode == 2 and "must be a commit id" in result.stderr
