"""Server configuration: one frozen dataclass, validated on construction, loaded once.

Precedence: command-line flag > environment (``PERCEPTION_<FIELD>``) > YAML file > default.
The entry point (``server.cli``) loads it and passes it down; nothing reads the environment
anywhere else.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perception.errors import ConfigError

ENV_PREFIX = "PERCEPTION_"
BACKENDS = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
LOG_FORMATS = ("text", "json")
PRIORITY_CLASSES = {"best_effort": 0, "normal": 1, "critical": 2}
# The most a derived message limit can be. Every open stream can have a whole message of this
# size in gRPC's receive buffers (docs/hardening.md), so it sets the floor of the server's worst
# case: 8 MiB holds a camera's JPEG up to 4K (a few MB at quality 90), and a raw 1920x1080 BGR8
# (6.2 MB) or 3840x1080 NV12 frame. Larger raw frames go through shared memory (--shm-allow), or the limit is
# raised with --max-message-bytes (and the memory it costs with it).
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MIN_MESSAGE_BYTES = 64 * 1024
# gRPC takes message limits as a signed 32-bit int.
MAX_MESSAGE_BYTES = 2**31 - 1
# The longest time a setting (a field named *_s) can name, about 24.8 days: gRPC takes its time
# settings in milliseconds as a signed 32-bit int, and the one bound keeps every other wait
# (grace_s, the stream and probation timers) well inside what Python's timeouts accept.
MAX_DURATION_S = (2**31 - 1) // 1000
# What YAML 1.1 does to unquoted values that look like text to a person: the reason a YAML value
# must already be of its setting's kind rather than be converted back to text.
YAML_QUOTING = "quote it in YAML, which reads 007 as 7, 0123 as 83, on / off / yes / no as booleans and ~ as null"


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``perception serve`` can be told. Times in milliseconds / seconds as named."""

    model: str = ""  # path of manifest.json (or its directory)
    variant: str = ""  # manifest variant name; "" = the manifest's default
    backends: tuple[str, ...] = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")  # fallback order
    # How inference spends the cores (resolve_arrangement): intra-op threads per batch, and batches
    # run at once. 0 = chosen from the core count: on a CPU one thread per batch and one batch per
    # core (bench/bench_workers.py: more frames per core than one batch over every core).
    threads: int = 0
    inference_workers: int = 0
    # Loopback by default: listening on every interface is a deployment's explicit choice.
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"  # /metrics has its own bind address
    metrics_port: int = 9108  # the port deploy/prometheus/prometheus.yml scrapes
    max_batch: int = 8  # largest batch a request or the engine takes; clipped to the engine's range
    # Frames per inference run, batched across cameras; 0 = chosen: 1 on a CPU (with one run per
    # core, batches of 4-8 served fewer frames at a longer latency: bench/bench_soak.py, docs/
    # performance.md), max_batch on a GPU.
    inference_batch: int = 0
    max_wait_ms: float = 4.0  # how long the batcher waits for a fuller batch
    queue_size: int = 2  # per camera; the latest frame wins, older ones are answered stale
    max_pending: int = 64  # frames queued across all cameras before shedding load
    outbox_size: int = 32  # answers held per stream for a client that is slow to read
    max_message_bytes: int = 0  # largest request / response; 0 = derived (message_limit)
    max_workers: int = 16  # gRPC handler threads for unary calls and health, beside one per stream
    # Unary Detect calls at once, below max_workers so that slow ones cannot take every handler
    # thread from health checks; past it a call is refused RESOURCE_EXHAUSTED. 0 = derived
    # (unary_detect_limit: max_workers less a quarter of them).
    max_unary_detect_calls: int = 0
    # Open StreamDetect calls, in all and per client address; each holds a handler thread.
    max_streams: int = 32
    max_streams_per_peer: int = 8
    stream_idle_timeout_s: float = 60.0  # a stream that sends nothing this long is ended
    # A stream whose frames cannot be served is read slower, up to one request per this many
    # seconds (limits.InvalidBackoff); 0 = off.
    invalid_backoff_max_s: float = 1.0
    # HTTP/2 keepalive: ping idle connections, refuse clients that ping too often, and end
    # connections after max_connection_age_s (with a grace) so long-lived streams rebalance
    # across replicas behind a load balancer.
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    min_client_ping_interval_s: float = 10.0
    max_connection_age_s: float = 1800.0
    max_connection_age_grace_s: float = 30.0
    # Undecoded request bytes held at once, in all and per stream: memory is bounded in bytes.
    max_undecoded_bytes: int = 128 * 1024 * 1024
    max_stream_undecoded_bytes: int = 64 * 1024 * 1024
    # Request bytes a stream's unanswered frames may hold before it reads the next request: a
    # stream of bigger frames has one in the server at a time (server.stream).
    max_stream_inflight_bytes: int = 4 * 1024 * 1024
    decode_threads: int = 0  # concurrent decodes across all streams; 0 = the number of cores
    # Decode limits, checked on the header before allocation; lower them to the cameras' sizes.
    max_image_pixels: int = 7680 * 4320
    # Progressive JPEG and PNG decode at full size, whatever the model's input: at 1080p one costs
    # about what a baseline 4K JPEG does (12-25 ms against 12 ms; at 4K 52-101 ms; measured by
    # bench/bench_kernels.py --only formats, docs/hardening.md). Raise it for cameras that
    # really send such frames; the kernel's own default (local tools) stays 4K.
    max_full_buffer_pixels: int = 1920 * 1080
    # Health follows the engine: NOT_SERVING (and a backend reload) after this many failed
    # batches in a row, SERVING again once the reloaded backend is warm (or a batch succeeds).
    unhealthy_after_failed_batches: int = 3
    insecure_token: bool = False  # allow bearer tokens over plaintext (they can be sniffed)
    # Let several server processes listen on the same gRPC port (SO_REUSEPORT); the kernel spreads
    # connections across them. Off: a second server on a taken port fails at start-up.
    reuse_port: bool = False
    # Load the multi-object tracker (numba, about 150 MB) at start, not when a frame first asks
    # for tracks (that frame then waits for it: seconds).
    preload_tracker: bool = False
    # An Ed25519 public key (PEM): load only artifacts whose manifest.json.sig verifies with it.
    manifest_public_key: str = ""
    # The admin service (LoadModel, Rollback, GetModelStatus): off unless admin_port is set (0 =
    # pick a free port, -1 = off); it always needs admin_tokens, and uses the server's TLS.
    admin_port: int = -1
    admin_host: str = "127.0.0.1"
    admin_tokens: tuple[str, ...] = ()
    # A swapped-in model is watched for probation_s: past max_error_rate failed batches (or a p99
    # over twice the previous model's) it is rolled back automatically.
    probation_s: float = 60.0
    probation_max_error_rate: float = 0.2
    # Graceful degradation: "auto" moves to a faster gated variant of the manifest under sustained
    # shedding (or past the p99 budget, or at the thermal limit) and back with hysteresis.
    degrade: str = "off"
    degrade_p99_budget_ms: float = 0.0  # 0 = judge by shedding alone
    degrade_window_s: float = 2.0
    thermal_path: str = ""  # a file holding a number, e.g. /sys/class/thermal/thermal_zone0/temp
    thermal_limit: float = 0.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # set => mutual TLS: clients must present a cert signed by it
    auth_tokens: tuple[str, ...] = ()  # non-empty => `authorization: Bearer <token>` required
    auth_token_file: str = ""  # a file of accepted tokens, one per line (read once, added to auth_tokens)
    cameras: tuple[str, ...] = ()  # allow-list of camera ids; empty = any
    # Camera ids that get their own metric label; any other is counted as "other" from the
    # first one. Empty: the `cameras` allow-list, else the first max_camera_labels ids seen.
    metric_cameras: tuple[str, ...] = ()
    # Camera priority classes, "camera=class" with class critical, normal or best_effort (unlisted:
    # normal). Under overload the batcher serves higher classes first and sheds lower ones first.
    camera_priorities: tuple[str, ...] = ()
    # Without an allow-list: the first N distinct camera ids get their own metric label, the
    # rest are counted as "other" (a vehicle has a few dozen cameras at most; bounds series).
    max_camera_labels: int = 32
    grace_s: float = 10.0  # SIGTERM: time to answer in-flight frames before exiting
    log_format: str = "text"
    warmup_iters: int = 3
    engine_cache_dir: str = ""  # TensorRT: where engines built on first start are cached
    build_engine_on_start: bool = False  # TensorRT: build (and cache) an engine if none matches
    engine_precision: str = "fp16"  # TensorRT engine of an FP32 variant (fp16: from its fp16 sibling)
    kserve: bool = False  # also serve KServe v2 / Open Inference Protocol gRPC on the same port
    # Shared-memory frames (proto SharedMemoryRef) from clients on the same host: off unless set
    # to the only segment-name prefix the server may open in /dev/shm (e.g. "perception-").
    shm_allow: str = ""
    shm_max_open: int = 16  # open segments cached; the least recently used is closed first

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("no model given: pass --model path/to/manifest.json (or PERCEPTION_MODEL)")
        # First: NaN compares false with everything, so it would pass every range check below.
        for f in dataclasses.fields(self):
            if isinstance(f.default, float):
                value = getattr(self, f.name)
                if not math.isfinite(value):
                    raise ConfigError(f"{f.name} must be a finite number, got {value}")
                if f.name.endswith("_s") and value > MAX_DURATION_S:
                    raise ConfigError(f"{f.name} must be at most {MAX_DURATION_S} s (about 24.8 days), got {value}")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ConfigError(f"backends must be a non-empty list from {BACKENDS}, got {list(self.backends)}")
        for name in ("threads", "inference_workers"):
            if not 0 <= getattr(self, name) <= 256:
                raise ConfigError(f"{name} must be in 0..256 (0 = from the core count), got {getattr(self, name)}")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ConfigError(f"{name} must be in 0..65535 (0 = pick a free port), got {value}")
        if not 1 <= self.max_batch <= 1024:
            raise ConfigError(f"max_batch must be in 1..1024, got {self.max_batch}")
        if not 0 <= self.inference_batch <= 1024:
            raise ConfigError(f"inference_batch must be in 0..1024 (0 = chosen for the runtime), got "
                              f"{self.inference_batch}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"max_wait_ms must be in 0..10000, got {self.max_wait_ms}")
        for name in ("queue_size", "max_pending", "outbox_size", "max_workers", "warmup_iters", "max_camera_labels",
                     "max_streams", "max_streams_per_peer", "max_undecoded_bytes", "max_stream_undecoded_bytes",
                     "max_stream_inflight_bytes",
                     "max_image_pixels", "max_full_buffer_pixels", "unhealthy_after_failed_batches"):
            if getattr(self, name) < (0 if name in ("warmup_iters", "max_camera_labels") else 1):
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_unary_detect_calls < 0 or (self.max_unary_detect_calls
                                               and self.max_unary_detect_calls >= max(2, self.max_workers)):
            raise ConfigError(f"max_unary_detect_calls must be in 1..{max(1, self.max_workers - 1)}, below max_workers "
                              f"({self.max_workers}) so that health checks keep a thread (0 = derived), got "
                              f"{self.max_unary_detect_calls}")
        if self.max_message_bytes and not MIN_MESSAGE_BYTES <= self.max_message_bytes <= MAX_MESSAGE_BYTES:
            raise ConfigError(
                f"max_message_bytes must be in {MIN_MESSAGE_BYTES}..{MAX_MESSAGE_BYTES} (0 = derived from "
                f"max_image_pixels), got {self.max_message_bytes}"
            )
        for name in ("stream_idle_timeout_s", "keepalive_time_s", "keepalive_timeout_s", "min_client_ping_interval_s",
                     "max_connection_age_s", "max_connection_age_grace_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.invalid_backoff_max_s < 0:
            raise ConfigError(f"invalid_backoff_max_s must be >= 0 (0 = off), got {self.invalid_backoff_max_s}")
        if self.decode_threads < 0:
            raise ConfigError(f"decode_threads must be >= 0 (0 = one per core), got {self.decode_threads}")
        if self.max_stream_undecoded_bytes > self.max_undecoded_bytes:
            raise ConfigError("max_stream_undecoded_bytes cannot exceed max_undecoded_bytes")
        for item in self.camera_priorities:
            cam, sep, cls = item.partition("=")
            if not sep or not cam or cls not in PRIORITY_CLASSES:
                raise ConfigError(f"camera_priorities: expected camera=class with class one of "
                                  f"{sorted(PRIORITY_CLASSES)}, got {item!r}")
        if self.admin_port >= 0 and not self.admin_tokens:
            raise ConfigError("the admin service (admin_port) needs admin_tokens: it can replace the served model")
        if self.admin_port > 0 and self.admin_port == self.port:
            # Without reuse_port the second bind fails at start-up; with it both servers bind, and
            # the kernel hands each of them some of the other's connections.
            raise ConfigError(f"admin_port must differ from port, got {self.admin_port} for both")
        loopback = self.admin_host in ("127.0.0.1", "localhost", "::1", "[::1]")
        if self.admin_port >= 0 and not (self.tls_cert or loopback or self.insecure_token):
            raise ConfigError("the admin service's tokens would cross the network in plaintext: configure TLS, keep "
                              "admin_host on loopback, or pass --insecure-token")
        if not -1 <= self.admin_port <= 65535:
            raise ConfigError(f"admin_port must be in -1..65535 (-1 = off, 0 = pick one), got {self.admin_port}")
        if self.degrade not in ("off", "auto"):
            raise ConfigError(f"degrade must be off or auto, got {self.degrade!r}")
        if self.degrade_window_s <= 0 or self.degrade_p99_budget_ms < 0:
            raise ConfigError("degrade_window_s must be positive and degrade_p99_budget_ms >= 0")
        if self.thermal_path:
            # Without a limit every reading was "hot": degraded to the fastest rung within two
            # windows, and never back. Without degrade the signal was read by nothing, silently.
            if not (math.isfinite(self.thermal_limit) and self.thermal_limit > 0):
                raise ConfigError(f"thermal_path needs thermal_limit, the reading at which to degrade (e.g. 85000 "
                                  f"for a thermal zone's millidegrees), got {self.thermal_limit}")
            if self.degrade != "auto":
                raise ConfigError("thermal_path is read only with degrade auto (--degrade auto)")
        if self.probation_s < 0 or not 0 <= self.probation_max_error_rate <= 1:
            raise ConfigError("probation_s must be >= 0 and probation_max_error_rate in [0, 1]")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both tls_cert and tls_key")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("mutual TLS (tls_client_ca) also needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "manifest_public_key"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"{name}: no such file {value}")
        if self.auth_token_file:
            tokens = read_token_file(self.auth_token_file, "auth_token_file")
            object.__setattr__(self, "auth_tokens", tuple(self.auth_tokens) + tokens)
        _check_tokens("auth_tokens", self.auth_tokens)
        _check_tokens("admin_tokens", self.admin_tokens)
        if set(self.admin_tokens) & set(self.auth_tokens):
            raise ConfigError("admin_tokens must differ from auth_tokens: the admin service has its own tokens, and a "
                              "client token that is also an admin one lets every camera replace the model")
        if self.auth_tokens and not self.tls_cert and not self.insecure_token:
            raise ConfigError("bearer tokens over plaintext can be read by anyone on the network: configure TLS "
                              "(tls_cert, tls_key) or pass --insecure-token to accept that")
        if self.grace_s < 0:
            raise ConfigError(f"grace_s must be >= 0, got {self.grace_s}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format must be one of {LOG_FORMATS}, got {self.log_format!r}")
        if self.shm_allow:
            from server.shm import check_prefix

            check_prefix(self.shm_allow)
            if not Path("/dev/shm").is_dir():
                raise ConfigError("shm_allow: this host has no /dev/shm (shared-memory frames need Linux)")
        if self.shm_max_open < 1:
            raise ConfigError(f"shm_max_open must be positive, got {self.shm_max_open}")
        if self.engine_precision not in ("fp32", "fp16", "int8"):
            raise ConfigError(f"engine_precision must be fp32, fp16 or int8, got {self.engine_precision!r}")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def message_limit(self) -> int:
        """The largest gRPC message the server reads: ``max_message_bytes``, or by default the
        largest raw BGR8 frame ``max_image_pixels`` allows (an eighth more for row padding, plus
        64 KiB), at most DEFAULT_MAX_MESSAGE_BYTES.

        It bounds memory where nothing else can: gRPC refuses a longer message at its length
        prefix, before buffering any of it, but HTTP/2 flow control lets every open stream have a
        whole message of up to this size in gRPC's receive buffers, whatever the server does with
        the ones it has read. Lowering ``max_image_pixels`` to the cameras' resolution therefore
        lowers the worst case of memory with it (docs/hardening.md)."""
        if self.max_message_bytes:
            return self.max_message_bytes
        return min(DEFAULT_MAX_MESSAGE_BYTES, self.max_image_pixels * 3 * 9 // 8 + 64 * 1024)

    def unary_detect_limit(self) -> int:
        """Unary Detect calls at once: ``max_unary_detect_calls``, or by default ``max_workers``
        less a quarter of them (at least one left; 12 of the default 16). The handler pool has
        ``max_streams + max_workers`` threads and every allowed stream can hold one, so
        ``max_workers`` is what unary calls and health checks share."""
        if self.max_unary_detect_calls:
            return self.max_unary_detect_calls
        return max(1, self.max_workers - max(1, self.max_workers // 4))

    def priorities(self) -> dict[str, int]:
        """camera id -> priority (higher is served first and shed last)."""
        return {cam: PRIORITY_CLASSES[cls] for cam, _, cls in (p.partition("=") for p in self.camera_priorities)}


def read_token_file(path: str, setting: str) -> tuple[str, ...]:
    """The bearer tokens in a file, one a line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {setting}: {exc}") from exc
    tokens = tuple(line.strip() for line in lines if line.strip())
    if not tokens:
        # An empty file must not silently turn authentication off.
        raise ConfigError(f"{setting} {path} holds no token")
    return tokens


def _check_tokens(name: str, tokens: tuple[str, ...]) -> None:
    """Bearer tokens are compared with what follows ``Bearer `` in a call's metadata, stripped:
    an empty token would let in a call that sends none, and one with whitespace never matches."""
    if any(not isinstance(t, str) or not t or any(ch.isspace() for ch in t) for t in tokens):
        raise ConfigError(f"{name}: every token must be a non-empty string without whitespace")


_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML / environment value into the field's type; one-line error otherwise.

    Text (environment, flags) is parsed. A YAML value must already be of the setting's kind:
    turning a number or a boolean back into text, or a fraction into an integer, would quietly
    change the setting (YAML_QUOTING)."""
    default = _FIELDS[name].default
    # A secret's value is never quoted in an error (it goes to stderr, the journal).
    shown = "(a value not shown: it is a secret)" if name.endswith("_tokens") else repr(value)
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return low in ("1", "true", "yes", "on")
            if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                return bool(value)
            raise ValueError(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            if isinstance(value, (list, tuple)):
                for item in value:
                    if not isinstance(item, str):
                        got = "a value not shown (a secret)" if name.endswith("_tokens") else repr(item)
                        raise ConfigError(f"config {name}: list items must be text, got {got}; {YAML_QUOTING}")
                return tuple(value)
            raise ValueError(value)
        if isinstance(default, str):
            if isinstance(value, str):
                return value
            if name == "degrade" and value is False:
                return "off"  # YAML's reading of an unquoted `degrade: off`
            raise ConfigError(f"config {name}: expected text, got {shown}; {YAML_QUOTING}")
        if isinstance(value, bool):
            raise ValueError(value)  # YAML's yes / no / on / off where a number belongs
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)  # int() would make 8.9 an 8
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config {name}: cannot use {shown} ({type(default).__name__} expected)") from None


def _from_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    # Accept either a flat mapping or one nested under "server:".
    if "server" in data and isinstance(data["server"], dict):
        data = data["server"]
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {unknown}; known: {sorted(_FIELDS)}")
    return dict(data)


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in env and env[key] != "":
            out[name] = env[key]
    return out


def given_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The settings given, each in its field's type, not yet validated (the defaults fill the
    rest): YAML ``file`` < ``env`` (PERCEPTION_*) < ``flags`` (None values ignored)."""
    merged: dict[str, Any] = {}
    if file:
        merged.update(_from_file(file))
    merged.update(_from_env(os.environ if env is None else env))
    for name, value in (flags or {}).items():
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            merged[name] = value
    return {k: _coerce(k, v) for k, v in merged.items()}


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file: str | os.PathLike[str] | None = None,
) -> ServerConfig:
    """Merge defaults < YAML ``file`` < ``env`` (PERCEPTION_*) < ``flags`` (None values ignored)."""
    return ServerConfig(**given_settings(flags, env, file))


def with_overrides(config: ServerConfig, **changes: Any) -> ServerConfig:
    """A copy with some fields changed, validated again."""
    return dataclasses.replace(config, **changes)


__all__ = ["ServerConfig", "load_config", "given_settings", "read_token_file", "with_overrides", "BACKENDS"]
