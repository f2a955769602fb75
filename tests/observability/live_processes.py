"""Real processes for the end-to-end observability test (test helper): a Prometheus server on
loopback, a `perception serve` subprocess, and a tiny Prometheus HTTP API client."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

READY = re.compile(r"ready grpc=(?P<ghost>\S+):(?P<gport>\d+) metrics=(?P<mhost>\S+):(?P<mport>\d+)")
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def perception_cmd(*args: str) -> list[str]:
    """argv running the `perception` CLI with this interpreter."""
    return [sys.executable, "-c", "import sys; from perception.cli import main; sys.exit(main())", *args]


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class ServeProcess:
    """`perception serve` on loopback; ``grpc`` / ``metrics`` are the bound host:port pairs."""

    def __init__(self, manifest: Path, cwd: Path, config: Path | None = None, timeout: float = 60.0) -> None:
        self.lines: list[str] = []
        extra = ["--config", str(config)] if config is not None else []
        self.proc = subprocess.Popen(
            perception_cmd("serve", "--model", str(manifest), "--port", "0", "--metrics-port", "0",
                           "--host", "127.0.0.1", *extra),
            cwd=cwd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        ready = threading.Event()
        self._match: re.Match[str] | None = None

        def drain() -> None:  # keeps the pipe from filling up for the server's whole life
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                m = READY.search(line)
                if m and self._match is None:
                    self._match = m
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(timeout) or self._match is None:
            stop(self.proc)
            raise RuntimeError("perception serve never logged its ready line:\n" + "".join(self.lines[-30:]))
        self.grpc: str = f"127.0.0.1:{self._match['gport']}"
        self.metrics: str = f"127.0.0.1:{self._match['mport']}"

    def stop(self) -> None:
        stop(self.proc)


class PrometheusProcess:
    """A real Prometheus scraping ``targets`` every ``interval_s``, storing into ``workdir``."""

    def __init__(self, binary: str, workdir: Path, targets: list[str], rule_files: list[Path],
                 interval_s: float = 1.0, timeout: float = 30.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": f"{int(interval_s * 1000)}ms",
                       "evaluation_interval": f"{int(interval_s * 1000)}ms",
                       "scrape_timeout": f"{int(interval_s * 900)}ms"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "perception", "static_configs": [{"targets": targets}]}],
        }
        cfg = workdir / "prometheus.yml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (workdir / "prometheus.log").read_text()
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {log}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("prometheus did not become ready")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)["result"]

    def scalar(self, expr: str, at: float | None = None) -> float:
        result = self.query(expr, at)
        if len(result) != 1:
            raise AssertionError(f"{expr}: expected one series, got {result}")
        return float(result[0]["value"][1])

    def wait_for_target_up(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            active = self.api("targets")["activeTargets"]
            if active and all(t["health"] == "up" for t in active):
                return
            time.sleep(0.3)
        raise AssertionError(f"targets never came up: {self.api('targets')}")

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()
