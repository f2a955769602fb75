"""The admin service (``perception.v1.Admin``): the model lifecycle over gRPC, on its own port.

Off unless ``admin_port`` is set; it always requires its own bearer tokens, and listens on
loopback unless told otherwise, so the camera-facing port never exposes model loading.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any, ParamSpec, TypeVar

import grpc

from perception.errors import ConfigError, ManifestError, ModelError, RefusedError
from perception.v1 import admin_pb2 as apb
from perception.v1 import admin_pb2_grpc as apb_grpc
from server.model_host import ModelHost

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _status(host: ModelHost) -> apb.ModelStatus:
    return apb.ModelStatus(**host.status())


class AdminService(apb_grpc.AdminServicer):
    def __init__(self, host: ModelHost) -> None:
        self._host = host

    def LoadModel(self, request: apb.LoadModelRequest, context: grpc.ServicerContext) -> apb.ModelStatus:
        if not request.manifest_path:
            raise RefusedError("LoadModel needs a manifest_path")
        try:
            self._host.load_and_swap(request.manifest_path, request.variant)
        except (ModelError, ManifestError, ConfigError) as exc:
            raise RefusedError(f"{exc}; still serving {self._host.current.describe()}") from exc
        return _status(self._host)

    def Rollback(self, request: apb.RollbackRequest, context: grpc.ServicerContext) -> apb.ModelStatus:
        try:
            self._host.rollback("asked for over the admin service")
        except ModelError as exc:
            raise RefusedError(str(exc)) from exc
        return _status(self._host)

    def GetModelStatus(self, request: apb.GetModelStatusRequest, context: grpc.ServicerContext) -> apb.ModelStatus:
        return _status(self._host)


class DaemonThreads(futures.Executor):
    """Runs each call on a daemon thread of its own: the admin server's handlers.

    Stopping the server cancels a call, not its handler: a LoadModel loading at shutdown goes on
    to its next step (``ModelHost.check_open``), which a TensorRT build can put minutes away on a
    Jetson. The interpreter waits at exit for the threads of a ThreadPoolExecutor, daemon or not:
    such a load kept the process alive after shutdown, until systemd killed it at its stop
    timeout. At most ``maximum_concurrent_rpcs`` calls run at once, and the host runs one load at
    a time (another LoadModel is refused at once), so a cancelled load leaves one thread at most."""

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> futures.Future[_T]:
        future: futures.Future[_T] = futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # the caller's to see, as from a pool's thread
                future.set_exception(exc)

        threading.Thread(target=run, name="admin", daemon=True).start()
        return future


def start_admin_server(host: ModelHost, address: str, tokens: tuple[str, ...], metrics: Any,
                       credentials: grpc.ServerCredentials | None) -> tuple[grpc.Server, int]:
    """A small gRPC server for the admin service alone, token-authenticated.

    Its port is its own (no SO_REUSEPORT, which gRPC sets by default): a second server on it
    fails to start (ConfigError) instead of the kernel splitting admin calls between the two."""
    from server.interceptors import ErrorInterceptor, TokenAuthInterceptor
    from server.listen import bind

    # gRPC only calls the executor's submit(); its type stubs ask for a ThreadPoolExecutor.
    server = grpc.server(DaemonThreads(),  # type: ignore[arg-type]
                         interceptors=[TokenAuthInterceptor(tokens, metrics), ErrorInterceptor(metrics)],
                         options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=4)
    apb_grpc.add_AdminServicer_to_server(AdminService(host), server)
    port = bind(server, address, credentials, "the admin service")
    server.start()
    log.info("admin service on %s", address.rsplit(":", 1)[0] + f":{port}")
    return server, port
