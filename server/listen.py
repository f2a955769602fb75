"""Binding a gRPC server to its address: the main service and the admin service alike."""

from __future__ import annotations

import grpc

from perception.errors import ConfigError


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC binds it: an IPv6 host in brackets (``::`` -> ``[::]:50051``;
    gRPC cannot bind ``:::50051``)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None, what: str) -> int:
    """Bind ``address`` (with TLS if ``credentials``); the port bound. ConfigError if it cannot
    be bound: gRPC says only "Failed to bind", in a RuntimeError."""
    try:
        return server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"cannot bind {what} to {address} (in use, or not a local address?)") from exc
