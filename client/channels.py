"""Channels to one or more servers, handed out round-robin.

A target list ("a:50051,b:50051") or one DNS name that resolves to several addresses is
expanded to one channel per address, and resolved again every 30 s (servers behind a name
come and go); each new stream (and each unary call) takes the next one, so a retry goes to
the next address in the rotation. gRPC's own ``round_robin`` policy balances
per call, but a stream is pinned to the sub-channel it started on, so spreading cameras
over servers has to happen here anyway.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from client.config import ClientConfig
from perception.errors import ConfigError, NotReadyError

log = logging.getLogger(__name__)


def resolve_targets(
    targets: tuple[str, ...], resolver: Callable[..., Any] = socket.getaddrinfo
) -> list[tuple[str, str]]:
    """Expand "host:port" targets to (address, host) pairs, one per distinct IP.

    A name that does not resolve is kept as given (gRPC resolves it again and reports the
    failure when it connects), and so is one that resolves to loopback addresses only:
    "localhost" is ::1 and 127.0.0.1, one machine, whose server often listens on one of them;
    a channel per address spread sessions onto the one nobody listens on. gRPC's own channel
    tries its addresses in turn. IPv6 addresses are bracketed.
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
        # One host: one address, or this machine's loopback in each family (127.0.0.1 and ::1);
        # 127.0.0.1 and 127.0.0.2 may be two local servers.
        loopback = [ipaddress.ip_address(ip.split("%")[0]) for ip in ips]
        one_host = len(ips) <= 1 or (all(a.is_loopback for a in loopback)
                                     and len({a.version for a in loopback}) == len(loopback))
        addrs = [target] if one_host else [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]
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
        # Twice the server's minimum ping interval (--min-client-ping-interval-s, 10 s): at the
        # minimum itself, a ping a little early is a strike, and two get the connection closed.
        ("grpc.keepalive_time_ms", 20_000),
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


def _log_lookup_failure(task: Any) -> None:
    """An asyncio pool's lookup that failed: its error is raised to the callers that awaited it
    (the first lookup); a refresh nobody awaited is logged, and tried again by the next call."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("resolving the server targets failed: %s", task.exception())


class ChannelPool:
    """One channel per resolved server address; ``next()`` rotates through them.

    The targets are resolved again every ``refresh_s`` seconds (outside the lock, by the next
    caller past that time): a name behind which servers come and go (a Kubernetes headless
    Service through a rolling update or a scale-out) follows them, where an address list fixed
    at start pointed at pods long gone. An address that disappears leaves the rotation at once;
    its channel is closed ``retire_s`` later (its streams then end and reconnect elsewhere), so
    a caller that was just handed it does not find it closed.

    ``aio=True`` makes grpc.aio channels for the asyncio client, which calls ``anext``: every
    lookup runs in a worker thread (a DNS lookup on the event loop stalled every camera for as
    long as it took), the first one too: the pool resolves and makes its channels at the first
    ``anext``, on the loop that uses them, not in the constructor (which ran its lookup on the
    loop of whoever made the client); and retired channels are closed on the loop ``retire_s``
    later (they used to be kept until ``aclose``: 50 refreshes left 100 channels open, their
    streams never ended).
    """

    def __init__(self, config: ClientConfig, aio: bool = False, resolver: Callable[..., Any] = socket.getaddrinfo,
                 refresh_s: float = 30.0, retire_s: float = 60.0) -> None:
        self._config = config
        self._aio = aio
        self._resolver = resolver
        self._refresh_s = refresh_s
        self._retire_s = retire_s
        self._lock = threading.Lock()
        self._creds = _credentials(config)
        # An asyncio pool has none until its first anext resolves them, off the loop.
        self.endpoints: list[Endpoint] = [] if aio else [
            self._endpoint(a, h) for a, h in resolve_targets(config.targets, resolver)]
        log.debug("server endpoints: %s", [e.address for e in self.endpoints])
        self._turn = 0
        self._resolved_at = time.monotonic()
        self._resolving = False
        self._retired: list[tuple[float, Endpoint]] = []  # (when, endpoint) left the rotation
        self._lookup: Any = None  # an asyncio pool's lookup task (asyncio.Task), the last one
        self._loop: Any = None  # the event loop an asyncio pool's channels and lookup belong to
        self._closed = False

    def _endpoint(self, address: str, host: str) -> Endpoint:
        mod: Any = grpc.aio if self._aio else grpc
        opts = channel_options(self._config, host)
        if self._creds is None:
            return Endpoint(address, mod.insecure_channel(address, options=opts))
        return Endpoint(address, mod.secure_channel(address, self._creds, options=opts))

    def next(self) -> Endpoint:
        with self._lock:
            due = not self._resolving and time.monotonic() - self._resolved_at >= self._refresh_s
            self._resolving = self._resolving or due
        if due:
            for e in self._follow(self._resolve()):
                e.channel.close()
        return self._take()

    async def anext(self) -> Endpoint:
        """``next`` for grpc.aio channels, on the event loop (see the class docstring).

        The lookup is a task of the pool's own, not of the caller: callers use the endpoints
        they have while it runs (the first lookup, which has none yet, every caller awaits),
        and a caller cancelled while waiting (a ``wait_for`` around a call, a stream closed)
        does not cancel it. The caller's own await of the lookup used to be it: a cancelled
        first lookup left the pool resolving for ever, and every later call waiting."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            # Channels and a lookup of another loop (since closed: asyncio.run twice with one
            # client): they can be neither used nor closed here, so this loop makes its own.
            with self._lock:
                self.endpoints, self._retired = [], []
            self._lookup, self._loop = None, None
        task = self._lookup
        if task is None or task.done():
            with self._lock:
                due = not self.endpoints or time.monotonic() - self._resolved_at >= self._refresh_s
            if due:
                self._loop = loop
                task = self._lookup = loop.create_task(self._refresh_aio())
                task.add_done_callback(_log_lookup_failure)
        if not self.endpoints and task is not None:
            await asyncio.shield(task)  # raises the lookup's error, if it failed
        if self._closed:
            raise NotReadyError("the client was closed")
        return self._take()

    async def _refresh_aio(self) -> None:
        import asyncio

        wanted = await asyncio.to_thread(self._resolve)
        if self._closed:  # aclose ran meanwhile: no channel is made for nobody to close
            return
        for e in self._follow(wanted):  # aio channels are made (and closed) on the loop
            await e.channel.close()

    def _take(self) -> Endpoint:
        with self._lock:
            endpoint = self.endpoints[self._turn % len(self.endpoints)]
            self._turn += 1
            return endpoint

    def _resolve(self) -> list[tuple[str, str]]:
        """Resolve the targets again: a DNS lookup, not under the lock. If it fails, the next
        caller due tries again; when it does not, ``_follow`` ends the lookup, once the
        endpoints are in place (a caller of an asyncio pool waiting for its first lookup used
        to find it over with no endpoints yet, and looked up again)."""
        try:
            return resolve_targets(self._config.targets, self._resolver)
        except BaseException:
            with self._lock:
                self._resolving = False
                self._resolved_at = time.monotonic()
            raise

    def _follow(self, wanted: list[tuple[str, str]]) -> list[Endpoint]:
        """Rotate through ``wanted``'s addresses from now on; the retired endpoints whose
        channels are due to close, for the caller to close."""
        with self._lock:
            current = {e.address: e for e in self.endpoints}
            endpoints = [current.get(a) or self._endpoint(a, h) for a, h in wanted]
            kept = {e.address for e in endpoints}
            now = time.monotonic()
            gone = [e for e in self.endpoints if e.address not in kept]
            if gone or len(endpoints) != len(self.endpoints):
                log.info("server endpoints now %s (were %s)", [e.address for e in endpoints],
                         [e.address for e in self.endpoints])
            self.endpoints = endpoints
            self._resolving = False
            self._resolved_at = now
            self._retired += [(now, e) for e in gone]
            due = [e for t, e in self._retired if now - t >= self._retire_s]
            self._retired = [(t, e) for t, e in self._retired if now - t < self._retire_s]
        return due

    def close(self) -> None:
        """Close sync channels (aio channels are closed with ``aclose``)."""
        if not self._aio:
            with self._lock:
                every = self.endpoints + [e for _, e in self._retired]
            for e in every:
                e.channel.close()

    async def aclose(self) -> None:
        self._closed = True
        with self._lock:
            every = self.endpoints + [e for _, e in self._retired]
        for e in every:
            await e.channel.close()
