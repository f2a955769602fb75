"""deploy/vehicle: the systemd unit, its environment file and the sd_notify supervisor."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy.cli_check import REPO_ROOT, module_written, parse_perception_argv

VEHICLE = REPO_ROOT / "deploy" / "vehicle"
UNIT = VEHICLE / "perception.service"
ENV_FILE = VEHICLE / "perception.env"
SUPERVISOR = VEHICLE / "sd_supervise.py"
INSTALL_ROOT = "/opt/perception"  # where the unit expects the install (deploy/README.md)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: [Section], Key=value (repeatable), `\\` continuations, # ; comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise AssertionError(f"unit line outside a section or without '=': {line!r}")
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and key.isidentifier(), f"{path.name}: not KEY=value: {raw!r}"
        env[key] = value.strip('"')
    return env


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


@pytest.fixture(scope="module")
def env_file() -> dict[str, str]:
    return parse_env_file(ENV_FILE)


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values and len(values) == 1, f"[{section}] {key} must be set exactly once, got {values}"
    return values[0]


def _systemd_analyze_verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Verify a copy whose /opt/perception points at a tmp tree with the executables it names
    (systemd-analyze checks ExecStart= binaries exist)."""
    root = tmp_path / "root"
    python = root / "opt/perception/venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    copy = tmp_path / "perception.service"
    copy.write_text(unit_text.replace(INSTALL_ROOT, str(root / "opt/perception")))
    return subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt-get install systemd)"
)


@needs_systemd_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    result = _systemd_analyze_verify(UNIT.read_text(), tmp_path)
    findings = [line for line in (result.stdout + result.stderr).splitlines() if "perception.service" in line]
    assert result.returncode == 0 and not findings, "\n".join(findings) or result.stderr


@needs_systemd_analyze
def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """`verify` exits 0 on unknown keys; the test above fails on any finding, as here."""
    broken = UNIT.read_text().replace("Restart=on-failure", "Restart=sometimes")
    broken = broken.replace("WatchdogSec=", "WatchdogSecs=")
    result = _systemd_analyze_verify(broken, tmp_path)
    text = result.stdout + result.stderr
    assert "sometimes" in text and "WatchdogSecs" in text


def test_unit_restarts_watchdogs_limits_and_sandboxes(
    unit: dict[str, dict[str, list[str]]], env_file: dict[str, str]
) -> None:
    svc = "Service"
    assert one(unit, svc, "Type") == "notify"
    assert one(unit, svc, "Restart") == "on-failure"
    assert one(unit, svc, "WatchdogSec").rstrip("s").isdigit()
    assert one(unit, svc, "EnvironmentFile") == "/etc/perception/perception.env"
    assert one(unit, svc, "MemoryMax").endswith(("M", "G"))
    assert one(unit, svc, "CPUQuota").endswith("%")
    assert one(unit, svc, "ProtectSystem") == "strict"
    assert one(unit, svc, "NoNewPrivileges") == "yes"
    read_only = one(unit, svc, "ReadOnlyPaths").split()
    model = env_file["PERCEPTION_MODEL"]
    assert any(model.startswith(p.rstrip("/") + "/") for p in read_only), f"{model} is not under ReadOnlyPaths"
    # The only writable place is the engine cache, and the server is told to use it.
    cache = one(unit, svc, "CacheDirectory")
    assert env_file["PERCEPTION_ENGINE_CACHE_DIR"] == f"/var/cache/{cache}"
    # systemd must wait longer than the server's own grace period before it SIGKILLs.
    stop_s = int(one(unit, svc, "TimeoutStopSec").rstrip("s"))
    assert stop_s > float(env_file["PERCEPTION_GRACE_S"])
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


# The specifiers the unit may use: those older than the credentials it loads (LoadCredential=,
# systemd 247); systemd drops a whole assignment with a specifier it does not know. %d (the
# credentials directory) came in a later release: a unit naming its credentials with it started
# the server without TLS or tokens on a systemd that lacked it. ${CREDENTIALS_DIRECTORY} in
# Exec*= lines works wherever credentials do.
OLD_SPECIFIERS = frozenset("abBCEfgGhHiIjJlLmnNopPsStTuUvVwW%")


def unit_specifiers(unit: dict[str, dict[str, list[str]]]) -> set[str]:
    """The ``%X`` specifiers in the unit's settings (comments excluded; ``%%`` is ``%``)."""
    return {m.group(1) for section in unit.values() for values in section.values() for value in values
            for m in re.finditer(r"%(.)", value)}


def test_unit_uses_no_specifier_newer_than_its_credentials(unit: dict[str, dict[str, list[str]]]) -> None:
    assert unit_specifiers(parse_unit("[Service]\nEnvironment=A=%d/x B=%%d\nCPUQuota=150%\n")) == {"d", "%"}
    used = unit_specifiers(unit)
    unknown = sorted(used - OLD_SPECIFIERS)
    assert not unknown, f"specifiers newer than systemd's credentials: {unknown}"


def test_env_file_is_a_valid_server_config(env_file: dict[str, str]) -> None:
    from server.config import ENV_PREFIX, ServerConfig, load_config

    fields = {f"{ENV_PREFIX}{name.upper()}" for name in ServerConfig.__dataclass_fields__}
    unknown = set(env_file) - fields
    assert not unknown, f"perception.env sets unknown server settings: {sorted(unknown)}"
    config = load_config(env=env_file)
    assert config.model == env_file["PERCEPTION_MODEL"]
    assert config.engine_cache_dir and config.build_engine_on_start


def test_exec_start_is_the_supervised_serve_command(
    unit: dict[str, dict[str, list[str]]], env_file: dict[str, str]
) -> None:
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    expanded = [env_file.get(a[2:-1], a) if a.startswith("${") and a.endswith("}") else a for a in argv]
    assert expanded[0] == f"{INSTALL_ROOT}/venv/bin/python"
    supervisor = Path(expanded[1])
    assert supervisor == Path(INSTALL_ROOT) / "src" / SUPERVISOR.relative_to(REPO_ROOT)
    serve = expanded[expanded.index("--") + 1 :]
    assert serve[0] == f"{INSTALL_ROOT}/venv/bin/perception"
    parse_perception_argv(serve)


# --- the sd_notify supervisor, against a real notify socket and a real server ---------------


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket; collects the messages sent to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, text: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in m for m in self.messages):
                return True
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())
        return any(text in m for m in self.messages)

    def close(self) -> None:
        self.sock.close()


def _supervise(
    notify: NotifySocket, command: list[str], tmp_path: Path, settings: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERCEPTION_")}
    env.update(settings or {})
    env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(SUPERVISOR), "--health-timeout", "2", "--", *command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )


def test_unit_command_with_its_env_file_serves_under_the_supervisor(
    tmp_path: Path, tiny_manifest: Path, unit: dict[str, dict[str, list[str]]], env_file: dict[str, str]
) -> None:
    """The unit's ExecStart with the sample environment file (JSON logs, TensorRT first in the
    backend order, falling back on this CPU machine): READY=1 once serving, WATCHDOG=1 while
    healthy, STOPPING=1 and exit 0 on SIGTERM. Only the model, ports, bind address and cache
    are moved into the test's sandbox."""
    if not module_written("server.cli"):
        pytest.skip("server.cli is not in this tree yet")
    notify = NotifySocket(tmp_path / "notify.sock")
    settings = dict(env_file)
    settings.update(
        PERCEPTION_MODEL=str(tiny_manifest),
        PERCEPTION_PORT="0",
        PERCEPTION_METRICS_PORT="0",
        PERCEPTION_HOST="127.0.0.1",
        PERCEPTION_ENGINE_CACHE_DIR=str(tmp_path / "cache"),
    )
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    serve = [settings.get(a[2:-1], a) if a.startswith("${") else a for a in argv[argv.index("--") + 1 :]]
    # Without the credentials (TLS, tokens): served and checked with them in
    # test_secrets.py::test_unit_serves_tls_and_tokens_from_its_credentials.
    credential = [i for i, a in enumerate(serve) if a.startswith("${CREDENTIALS_DIRECTORY}/")]
    serve = [a for i, a in enumerate(serve) if i not in credential and i + 1 not in credential]
    command = [str(Path(sys.executable).parent / "perception"), *serve[1:]]
    proc = _supervise(notify, command, tmp_path, settings)
    try:
        assert proc.stderr is not None  # piped by _supervise
        ready = notify.wait_for("READY=1", 60)
        assert ready, f"no READY=1; stderr:\n{proc.stderr.read() if proc.poll() is not None else ''}"
        first_ready = next(i for i, m in enumerate(notify.messages) if "READY=1" in m)
        assert not any("WATCHDOG=1" in m for m in notify.messages[:first_ready]), "fed before ready"
        # WATCHDOG_USEC=1 s -> a ping every 0.5 s while gRPC health answers SERVING.
        deadline = time.monotonic() + 10
        while sum("WATCHDOG=1" in m for m in notify.messages) < 2 and time.monotonic() < deadline:
            notify.wait_for("never", 0.3)
        assert sum("WATCHDOG=1" in m for m in notify.messages) >= 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "the server's graceful exit code is passed through"
        assert notify.wait_for("STOPPING=1", 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_supervisor_starves_the_watchdog_when_health_fails(tmp_path: Path) -> None:
    """A process that claims readiness but whose gRPC health never answers is not fed."""
    notify = NotifySocket(tmp_path / "notify.sock")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    liar = [
        sys.executable,
        "-c",
        f"import sys, time; print('ready grpc=127.0.0.1:{dead_port} metrics=127.0.0.1:1', file=sys.stderr, flush=True)"
        "; time.sleep(60)",
    ]
    proc = _supervise(notify, liar, tmp_path)
    try:
        assert notify.wait_for("READY=1", 20)
        notify.wait_for("WATCHDOG=1", 2.5)
        assert not any("WATCHDOG=1" in m for m in notify.messages)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_supervisor_without_notify_socket_is_the_command_itself(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    result = subprocess.run(
        [sys.executable, str(SUPERVISOR), "--", sys.executable, "-c", "import os; print(os.getppid())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    assert int(result.stdout) == os.getpid(), "without systemd it execs the command (no extra process)"
