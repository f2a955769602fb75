"""``perception serve`` / ``perception health`` as subprocesses: ready line, SIGTERM, no torch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from perception.v1 import detector_pb2 as pb
from perception.v1 import detector_pb2_grpc as pb_grpc
from tests.server.conftest import jpeg, request

READY = re.compile(r"ready grpc=(\S+):(\d+) metrics=(\S+):(\d+)")
REPO = Path(__file__).resolve().parents[2]


class Served:
    def __init__(self, proc: subprocess.Popen, lines: list[str]) -> None:
        self.proc, self.lines = proc, lines
        self.grpc_port = self.metrics_port = 0


def start_serve(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> Served:
    proc = subprocess.Popen(
        [sys.executable, "-m", "perception.cli", "serve", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )
    lines: list[str] = []
    ready = threading.Event()
    served = Served(proc, lines)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = READY.search(line)
            if m and not ready.is_set():
                served.grpc_port, served.metrics_port = int(m.group(2)), int(m.group(4))
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    t_end = time.monotonic() + timeout
    while not ready.wait(0.1):
        if proc.poll() is not None or time.monotonic() > t_end:
            proc.kill()
            raise AssertionError("server did not become ready:\n" + "".join(lines))
    return served


def stop(served: Served) -> int:
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
    try:
        return served.proc.wait(15)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        raise


def test_serve_ready_health_and_sigterm_with_stream_in_flight(tiny_manifest, tmp_path):
    served = start_serve(["--model", str(tiny_manifest), "--host", "127.0.0.1", "--port", "0",
                          "--metrics-port", "0", "--grace-s", "5", "--log-format", "json", "--threads", "1"])
    try:
        assert sum(bool(READY.search(line)) for line in served.lines) == 1
        address = f"127.0.0.1:{served.grpc_port}"
        health = subprocess.run([sys.executable, "-m", "perception.cli", "health", "--server", address],
                                capture_output=True, text=True, cwd=REPO, timeout=30)
        assert health.returncode == 0, health.stderr
        assert "SERVING" in health.stdout
        import urllib.request

        body = urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=5).read().decode()
        assert "perception_stage_latency_seconds" in body

        channel = grpc.insecure_channel(address)
        stub = pb_grpc.DetectorStub(channel)
        img = jpeg()
        sent = threading.Event()

        def frames():
            for i in range(3):
                yield request(f"cam{i}", i, img)  # one frame per camera: none can be stale
            sent.set()
            time.sleep(1.0)  # the stream stays open while SIGTERM arrives

        answers = stub.StreamDetect(frames(), timeout=20)
        got = [next(answers) for _ in range(3)]
        sent.wait(5)
        served.proc.send_signal(signal.SIGTERM)
        rest = []
        with pytest.raises(grpc.RpcError) as err:
            for a in answers:
                rest.append(a)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in (err.value.details() or "")
        assert [a.sequence for a in got] == [0, 1, 2] and all(a.status == pb.FRAME_STATUS_OK for a in got)
        channel.close()
        t0 = time.monotonic()
        assert stop(served) == 0
        assert time.monotonic() - t0 < 6
        log = "".join(served.lines)
        assert '"level": "INFO"' in log  # structured (JSON) log lines
    finally:
        if served.proc.poll() is None:
            served.proc.kill()


def test_health_cli_fails_without_a_server():
    r = subprocess.run([sys.executable, "-m", "perception.cli", "health", "--server", "127.0.0.1:1", "--timeout", "1"],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr


def test_serve_works_with_torch_unimportable(tiny_manifest, tmp_path):
    shim = tmp_path / "shim" / "torch"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "raise ImportError('torch is blocked in this test: the server must not need it')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "shim"), str(REPO)])
    served = start_serve(["--model", str(tiny_manifest), "--host", "127.0.0.1", "--port", "0",
                          "--metrics-port", "0", "--threads", "1"], env=env)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
        resp = pb_grpc.DetectorStub(channel).Detect(request("front", 1, jpeg()), timeout=10)
        assert resp.status == pb.FRAME_STATUS_OK
        channel.close()
        assert stop(served) == 0
        assert not any("torch" in line and "Traceback" in line for line in served.lines)
    finally:
        if served.proc.poll() is None:
            served.proc.kill()


def test_serve_config_errors_are_one_line(tiny_manifest, tmp_path):
    cfg = tmp_path / "server.yaml"
    cfg.write_text("max_batch: 0\n")
    r = subprocess.run([sys.executable, "-m", "perception.cli", "serve", "--model", str(tiny_manifest),
                        "--config", str(cfg)],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 1
    assert "max_batch must be in 1..1024" in r.stderr and "Traceback" not in r.stderr


def test_serve_binds_an_ipv6_host_and_names_it_in_brackets(tiny_manifest):
    """``--host ::1`` used to fail with a bind error (gRPC cannot bind ``::1:0``), and an
    unbracketed ready line could not be parsed by the vehicle supervisor."""
    served = start_serve(["--model", str(tiny_manifest), "--host", "::1", "--port", "0", "--metrics-host", "::1",
                          "--metrics-port", "0", "--threads", "1"])
    try:
        line = next(line for line in served.lines if READY.search(line))
        assert f"ready grpc=[::1]:{served.grpc_port} metrics=[::1]:{served.metrics_port}" in line
        import importlib.util

        spec = importlib.util.spec_from_file_location("sd_supervise", REPO / "deploy/vehicle/sd_supervise.py")
        assert spec is not None and spec.loader is not None
        supervise = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(supervise)
        m = supervise.READY_RE.search(line)
        assert m is not None and (m["host"], int(m["port"])) == ("[::1]", served.grpc_port)
        channel = grpc.insecure_channel(f"[::1]:{served.grpc_port}")
        answer = pb_grpc.DetectorStub(channel).Detect(request("front", 0, jpeg()), timeout=20)
        assert answer.status == pb.FRAME_STATUS_OK
        channel.close()
    finally:
        assert stop(served) == 0


@pytest.mark.parametrize("admin_file, needle", [
    ("tokens", "admin_tokens must differ from auth_tokens"),
    ("empty", "holds no token"),
    ("latin1", "cannot read --admin-token-file"),
])
def test_serve_refuses_admin_token_files_that_open_the_admin_service(tiny_manifest, tmp_path, admin_file, needle):
    """The client tokens' file given as the admin one used to make every camera an admin; an
    empty admin file or one that is not UTF-8 is refused in one line, as a client token file is."""
    (tmp_path / "tokens").write_text("camera-token\n")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "latin1").write_bytes(b"caf\xe9\n")
    r = subprocess.run([sys.executable, "-m", "perception.cli", "serve", "--model", str(tiny_manifest),
                        "--port", "0", "--metrics-port", "0", "--insecure-token",
                        "--auth-token-file", str(tmp_path / "tokens"), "--admin-port", "0",
                        "--admin-token-file", str(tmp_path / admin_file)],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 1
    assert needle in r.stderr and "Traceback" not in r.stderr
