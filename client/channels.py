"""Channels to one or more servers, handed out round-robin.

A target list ("a:50051,b:50051") or one DNS name that resolves to several addresses is
expanded to one channel per address; each new stream (and each unary call) takes the next
one, and a failed address is skipped on retry. gRPC's own ``round_robin`` policy balances
per call, but a stream is pinned to the sub-channel it started on, so spreading cameras
over servers has to happen here anyway.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from client.config import ClientConfig
from perception.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_targets(
    targets: tuple[str, ...], resolver: Callable[..., Any] = socket.getaddrinfo
) -> list[tuple[str, str]]:
    """Expand "host:port" targets to (address, host) pairs, one per distinct IP.

    A name that does not resolve is kept as given (gRPC resolves it again and reports the
    failure when it connects); IPv6 addresses are bracketed.
    """
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for target in targets:
        host, _, port = target.rpartition(":")
        bare = host.strip("[]")
        try:
            infos = resolver(bare, int(port), type=socket.SOCK_STREAM)
            ips = list(dict.fromkeys(info[4][0] for info in infos))
        except (OSError, UnicodeError):
            ips = []
        addrs = [target] if len(ips) <= 1 else [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]
        for a in addrs:
            if a not in seen:
                seen.add(a)
                out.append((a, bare))
    return out


@dataclass
class Endpoint:
    address: str
    channel: Any  # grpc.Channel or grpc.aio.Channel


def _credentials(config: ClientConfig) -> grpc.ChannelCredentials | None:
    tls = config.tls
    if tls is None:
        return None

    def read(path: Any) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read TLS file {path}: {exc.strerror}") from exc

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls.ca), private_key=read(tls.key), certificate_chain=read(tls.cert)
    )


def channel_options(config: ClientConfig, host: str) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 0),
        # Our own backoff decides when to retry; keep gRPC's reconnect probing snappy.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]
    if config.tls is not None:
        name = config.tls.server_name or host
        opts.append(("grpc.ssl_target_name_override", name))
    return opts


class ChannelPool:
    """One channel per resolved server address; ``next()`` rotates through them.

    ``aio=True`` makes grpc.aio channels (for the asyncio client).
    """

    def __init__(self, config: ClientConfig, aio: bool = False) -> None:
        self._config = config
        self._aio = aio
        self._lock = threading.Lock()
        creds = _credentials(config)
        self.endpoints: list[Endpoint] = []
        mod: Any = grpc.aio if aio else grpc
        for address, host in resolve_targets(config.targets):
            opts = channel_options(config, host)
            if creds is None:
                ch = mod.insecure_channel(address, options=opts)
            else:
                ch = mod.secure_channel(address, creds, options=opts)
            self.endpoints.append(Endpoint(address, ch))
        log.debug("server endpoints: %s", [e.address for e in self.endpoints])
        self._cycle = itertools.cycle(range(len(self.endpoints)))

    def next(self) -> Endpoint:
        with self._lock:
            return self.endpoints[next(self._cycle)]

    def close(self) -> None:
        """Close sync channels (aio channels are closed with ``aclose``)."""
        if not self._aio:
            for e in self.endpoints:
                e.channel.close()

    async def aclose(self) -> None:
        for e in self.endpoints:
            await e.channel.close()
