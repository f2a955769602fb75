"""Client configuration: where the servers are, how to authenticate, how hard to push.

Frozen and validated on construction; built once at the entry point and passed down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from perception.errors import ConfigError


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the server; with ``cert`` and ``key`` also a client certificate (mTLS).

    ``server_name`` overrides the name checked against the server certificate (needed when
    a DNS name is expanded to IP addresses for round-robin).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = ""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("mTLS needs both a client certificate and its key")
        for p in (self.ca, self.cert, self.key):
            if p is not None and not Path(p).is_file():
                raise ConfigError(f"TLS file not found: {p}")


# A restart that reuses its cached engine has to fit in here; a first start that builds a
# TensorRT engine may take up to 10 minutes (the startupProbe in deploy/k8s/deployment.yaml)
# and needs a longer bound. Not a measurement: no start-up time is measured in this repository.
DEFAULT_GIVE_UP_AFTER_S = 120.0


@dataclass(frozen=True)
class BackoffConfig:
    """Reconnect delays: ``initial_s * multiplier**attempt``, capped at ``max_s``, with full
    jitter in [(1 - jitter) * d, d] so a fleet of camera nodes does not reconnect in lock-step.

    A streak of failures (no answer in between) ends in giving up when it has lasted
    ``give_up_after_s`` seconds since its first failure with frames waiting for an answer, or
    after ``max_attempts`` failed attempts with frames waiting, whichever comes first (a stream
    with nothing in flight is never given up on); 0 turns a bound off (both 0 =
    never give up). Time is the bound that matters: a server that restarts is back after its
    start-up time, however many attempts that takes.
    """

    initial_s: float = 0.1
    max_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_attempts: int = 0
    give_up_after_s: float = DEFAULT_GIVE_UP_AFTER_S

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s or self.multiplier < 1.0:
            raise ConfigError("backoff needs 0 < initial_s <= max_s and multiplier >= 1")
        if not 0.0 <= self.jitter <= 1.0 or self.max_attempts < 0:
            raise ConfigError("backoff jitter must be in [0, 1] and max_attempts >= 0")
        if not self.give_up_after_s >= 0.0:
            raise ConfigError(f"give_up_after_s must be >= 0 (0 = no time bound), got {self.give_up_after_s}")


# Half the server's default idle timeout (``stream_idle_timeout_s``, 60 s): a quiet session ends
# its call itself, before the server ends it as idle. Not a measurement.
DEFAULT_IDLE_CLOSE_S = 30.0


@dataclass(frozen=True)
class ClientConfig:
    """How a client talks to one or more servers.

    targets: "host:port" addresses; one name that resolves to several addresses is expanded
        and used round-robin, as is a list.
    window: frames in flight per stream before ``send`` blocks.
    deadline_ms: per-frame deadline sent to the server (0 = none); unary calls also use it
        (plus ``rpc_timeout_s``) as their gRPC deadline.
    response_timeout_s: a stream whose oldest unanswered frame waits longer than this is
        considered dead and reconnected (a hung server sends no error).
    idle_close_s: a stream session with nothing in flight for this long ends its call, giving
        the server its stream slot back; the next frame opens a new one (a session opens its
        call only at its first frame).
    """

    targets: tuple[str, ...]
    tls: TlsConfig | None = None
    token: str = ""
    window: int = 4
    deadline_ms: int = 0
    rpc_timeout_s: float = 10.0
    response_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    backoff: BackoffConfig = field(default_factory=BackoffConfig)
    max_message_bytes: int = 64 * 1024 * 1024
    idle_close_s: float = DEFAULT_IDLE_CLOSE_S

    def __post_init__(self) -> None:
        if not self.targets:
            raise ConfigError("no server address given")
        for t in self.targets:
            host, sep, port = t.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"server address must be HOST:PORT, got {t!r}")
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if not self.idle_close_s > 0:
            raise ConfigError(f"idle_close_s must be positive, got {self.idle_close_s}")
        if not 0 <= self.deadline_ms < 1 << 32 or self.rpc_timeout_s <= 0 or self.response_timeout_s <= 0:
            raise ConfigError("deadline_ms must be in [0, 2^32) (the wire's uint32) and timeouts positive")
        if any(c in self.token for c in "\r\n"):
            raise ConfigError("token must be a single line")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: ``authorization: Bearer <token>`` when a token is set."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()
