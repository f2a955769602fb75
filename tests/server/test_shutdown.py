"""Shutdown: a load still running does not outlive it, and health stays NOT_SERVING through the drain."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from perception.errors import ModelError
from perception.v1 import admin_pb2 as apb
from perception.v1 import admin_pb2_grpc as apb_grpc
from server.app import SERVICE_NAME
from tests.server.test_lifecycle import TOKEN, freed
from tests.tiny_model import make_tiny_artifact

REPO = Path(__file__).resolve().parents[2]


def test_a_load_running_at_shutdown_stops_at_its_next_step(serve: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An admin LoadModel still loading its engine when shutdown begins: stopping the admin
    server cancels the call, not the load, which used to go on to warm the engine up and verify
    it after every engine was freed, on a thread the interpreter waits for at exit. It stops at
    its next step now, its engine freed, on a daemon thread."""
    from server import app

    run = serve(admin_port=0, admin_tokens=("adm1n",))
    host = run.server.models
    first = host.current
    loading, go = threading.Event(), threading.Event()
    loaded: list[Any] = []
    warmed: list[Any] = []
    load_backend, warm_up = app.backend_for, app._warm_up

    def slow_backend_for(*args: Any, **kw: Any) -> Any:  # stands in for a TensorRT build (minutes on a Jetson)
        backend = load_backend(*args, **kw)
        loaded.append(backend[0])
        loading.set()
        assert go.wait(30)
        return backend

    def recorded_warm_up(backend: Any, *args: Any) -> None:
        warmed.append(backend)
        warm_up(backend, *args)

    monkeypatch.setattr(app, "backend_for", slow_backend_for)
    monkeypatch.setattr(app, "_warm_up", recorded_warm_up)
    ended = threading.Event()
    load: dict[str, Any] = {}
    load_and_swap = host.load_and_swap

    def watched_load_and_swap(*args: Any, **kw: Any) -> Any:
        load["thread"] = threading.current_thread()
        try:
            return load_and_swap(*args, **kw)
        except Exception as exc:
            load["error"] = exc
            raise
        finally:
            ended.set()

    monkeypatch.setattr(host, "load_and_swap", watched_load_and_swap)
    with grpc.insecure_channel(f"127.0.0.1:{run.server.admin_port}") as channel:
        call = apb_grpc.AdminStub(channel).LoadModel.future(
            apb.LoadModelRequest(manifest_path=str(make_tiny_artifact(tmp_path / "next"))), metadata=TOKEN)
        assert loading.wait(30)
        assert run.server.shutdown(0.5)
        go.set()
        assert ended.wait(10), "the load went on after shutdown"
        with pytest.raises(grpc.RpcError):
            call.result(timeout=10)
    assert isinstance(load.get("error"), ModelError) and "shutting down" in str(load["error"])
    assert not warmed, "an engine was warmed up after shutdown"
    assert freed(loaded[0], first), "the engine loaded for the refused model was not freed"
    assert load["thread"].daemon, "the load ran on a thread the interpreter waits for at exit"
    assert host.current is first and host.swaps == 0


# A server whose admin LoadModel never ends (a TensorRT build that outlasts systemd's stop
# timeout), shut down as `perception serve` does on SIGTERM; then the script's end.
NEVER_ENDING_LOAD = """
import sys
import threading
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from perception.v1 import admin_pb2 as apb
from perception.v1 import admin_pb2_grpc as apb_grpc
from server.app import create_server
from server.config import ServerConfig
from tests.tiny_model import make_tiny_artifact

manifest = str(make_tiny_artifact(Path(sys.argv[1])))
server, _ = create_server(ServerConfig(model=manifest, port=0, metrics_port=0, threads=1, warmup_iters=1,
                                       admin_port=0, admin_tokens=("adm1n",)), CollectorRegistry())
loading = threading.Event()


def never_done(path, variant):
    loading.set()
    threading.Event().wait()


server.models._loader = never_done
with grpc.insecure_channel(f"127.0.0.1:{server.admin_port}") as channel:
    # Kept in a name: a call's future cancels the call when it is collected.
    call = apb_grpc.AdminStub(channel).LoadModel.future(apb.LoadModelRequest(manifest_path=manifest),
                                                        metadata=[("authorization", "Bearer adm1n")])
    assert loading.wait(30)
    assert server.shutdown(0.5)
print("shut down", flush=True)
"""


def test_the_process_ends_after_shutdown_with_a_load_still_running(tmp_path: Path) -> None:
    """The interpreter used to wait at exit for the admin handler still loading: the process
    outlived its shutdown by the whole load, and systemd killed it at TimeoutStopSec."""
    log = tmp_path / "stderr"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", NEVER_ENDING_LOAD, str(tmp_path / "art")], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "shut down", log.read_text()[-2000:]
        assert proc.wait(10) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("recovery", ["a batch succeeds", "a model is swapped in"])
def test_health_stays_not_serving_through_the_drain(serve: Any, recovery: str) -> None:
    """A batch succeeding again (or a model swapped in) after failed batches made the server
    NOT_SERVING, and SIGTERM exactly between its check of draining and its set(): health used
    to say SERVING again for the whole drain."""
    server = serve(channel=False).server
    server.engine_healthy = False  # failed batches: NOT_SERVING until a batch succeeds
    server.set_serving(False)

    class ShutdownAfterTheCheck(threading.Event):
        """The recovery finds the server not draining, and the whole shutdown runs before it
        goes on."""

        def is_set(self) -> bool:
            draining = super().is_set()
            if not draining:
                stopping = threading.Thread(target=server.shutdown, args=(0.5,))
                stopping.start()
                stopping.join(30)
                assert not stopping.is_alive()
            return draining

    server.draining = ShutdownAfterTheCheck()
    if recovery == "a batch succeeds":
        server.on_batch(True)
    else:
        server.model_changed()
    context: Any = None  # not read for a service whose status is set
    for name in ("", SERVICE_NAME):
        status = server.health.Check(health_pb2.HealthCheckRequest(service=name), context).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING, name
