"""The admin service (``perception.v1.Admin``): the model lifecycle over gRPC, on its own port.

Off unless ``admin_port`` is set; it always requires its own bearer tokens, and listens on
loopback unless told otherwise, so the camera-facing port never exposes model loading.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from perception.errors import ConfigError, ManifestError, ModelError, RefusedError
from perception.v1 import admin_pb2 as apb
from perception.v1 import admin_pb2_grpc as apb_grpc
from server.model_host import ModelHost

log = logging.getLogger(__name__)


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


def start_admin_server(host: ModelHost, address: str, tokens: tuple[str, ...], metrics: Any,
                       credentials: grpc.ServerCredentials | None) -> tuple[grpc.Server, int]:
    """A small gRPC server for the admin service alone, token-authenticated."""
    from concurrent import futures

    from server.interceptors import ErrorInterceptor, TokenAuthInterceptor

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="admin"),
                         interceptors=[TokenAuthInterceptor(tokens, metrics), ErrorInterceptor(metrics)],
                         maximum_concurrent_rpcs=4)
    apb_grpc.add_AdminServicer_to_server(AdminService(host), server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    log.info("admin service on %s", address.rsplit(":", 1)[0] + f":{port}")
    return server, port
