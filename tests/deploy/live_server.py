"""Start a real `perception serve` subprocess on free ports and wait for its ready line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

READY_RE = re.compile(r"ready grpc=(?P<host>\S+):(?P<port>\d+) metrics=(?P<mhost>\S+):(?P<mport>\d+)")


@dataclass
class LiveServer:
    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait: the server's graceful shutdown; returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            self.process.kill()
            self.process.wait()
            raise AssertionError("perception serve did not exit within its grace period after SIGTERM") from exc


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERCEPTION_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@contextmanager
def serve(
    command: Sequence[str],
    manifest: Path,
    *,
    extra: Sequence[str] = (),
    cwd: Path | None = None,
    timeout_s: float = 60.0,
) -> Iterator[LiveServer]:
    """``command`` is the serve prefix, e.g. ``[".../bin/perception", "serve"]``."""
    argv = [*command, "--model", str(manifest), "--port", "0", "--metrics-port", "0", "--host", "127.0.0.1", *extra]
    with run_server(argv, _env(), cwd=cwd, timeout_s=timeout_s) as server:
        yield server


@contextmanager
def run_server(
    argv: Sequence[str], env: Mapping[str, str], *, cwd: Path | None = None, timeout_s: float = 60.0
) -> Iterator[LiveServer]:
    """``perception serve`` started exactly as ``argv`` and ``env`` say: an image's ENTRYPOINT in
    the container's environment, say."""
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=cwd,
                               env=dict(env))
    lines: list[str] = []
    ready = threading.Event()
    found: dict[str, int] = {}

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            match = READY_RE.search(line)
            if match and not ready.is_set():
                found["port"], found["mport"] = int(match["port"]), int(match["mport"])
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"`{' '.join(argv)}` never logged its ready line:\n{''.join(lines)[-3000:]}")
    server = LiveServer(process=process, port=found["port"], metrics_port=found["mport"], stderr_lines=lines)
    try:
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
