"""``perception serve``: load a manifest's model and serve it over gRPC until SIGTERM.

When the model is loaded and warm (health SERVING) it logs exactly one line containing
``ready grpc=HOST:PORT metrics=HOST:MPORT`` with the bound ports. On SIGTERM / SIGINT it stops
accepting, answers in-flight frames and exits 0 within the grace period.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from typing import Any

log = logging.getLogger("server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perception serve",
        description="Serve a manifest's model over gRPC. Settings: flag > PERCEPTION_* env > --config file.",
    )
    a = p.add_argument
    a("--model", help="manifest.json of the model (or its directory)")
    a("--config", help="YAML file of settings (flat, or under a 'server:' key)")
    a("--variant", help="manifest variant to serve (default: the manifest's default)")
    a("--backend", dest="backends", help="fallback order, e.g. tensorrt,onnxruntime-cuda,onnxruntime-cpu")
    a("--host", help="gRPC address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    a("--port", type=int, help="gRPC port; 0 picks a free one")
    a("--metrics-host", help="/metrics address to bind (default 127.0.0.1)")
    a("--metrics-port", type=int, help="Prometheus /metrics port; 0 picks a free one")
    a("--threads", type=int, help="inference runtime intra-op threads per batch (default: 1 on a CPU)")
    a("--inference-workers", type=int, help="inference batches run at once (default: one per core on a CPU, "
      "1 on a GPU)")
    a("--max-batch", type=int, help="largest batch a request or the engine takes")
    a("--inference-batch", type=int, help="frames per inference run, batched across cameras (default: 1 on a "
      "CPU, --max-batch on a GPU)")
    a("--max-wait-ms", type=float, help="longest wait for a batch to fill")
    a("--queue-size", type=int, help="frames queued per camera (the latest wins)")
    a("--max-pending", type=int, help="frames queued in total before shedding load")
    a("--outbox-size", type=int, help="answers held per stream for a slow reader")
    a("--max-message-bytes", type=int, help="largest request / response message; default: the largest raw frame "
      "--max-image-pixels allows, at most 8 MiB (every open stream can have one such message in gRPC's buffers; "
      "raw frames above that go through --shm-allow, or raise this)")
    a("--tls-cert", help="server certificate (PEM); enables TLS")
    a("--tls-key", help="server private key (PEM)")
    a("--tls-client-ca", help="CA bundle for client certificates; enables mutual TLS")
    a("--auth-token-file", help="file with accepted bearer tokens, one per line")
    a("--reuse-port", action="store_const", const=True,
      help="let several server processes share the gRPC port (SO_REUSEPORT): the kernel spreads connections "
           "(not streams) across them, each process its own server with its own GIL, metrics port and limits "
           "(docs/performance.md)")
    a("--preload-tracker", action="store_const", const=True,
      help="load the multi-object tracker (numba's compiled loops, about 150 MB) at start; by default it is "
           "loaded when a frame first asks for tracks, and that frame waits for it (seconds; docs/tracking.md)")
    a("--insecure-token", action="store_const", const=True,
      help="accept bearer tokens without TLS (anyone on the network can read them)")
    a("--manifest-public-key", help="Ed25519 public key (PEM): serve only artifacts signed with its private key")
    a("--admin-port", type=int, help="port of the admin service (model load / rollback); default off")
    a("--admin-host", help="admin service bind address (default 127.0.0.1)")
    a("--admin-token-file", help="file with the admin service's bearer tokens, one per line")
    a("--probation-s", type=float, help="seconds a swapped-in model is watched for automatic rollback")
    a("--probation-max-error-rate", type=float,
      help="share of failed batches in probation past which the new model is rolled back (default 0.2)")
    a("--degrade", choices=("off", "auto"), help="auto: serve a faster gated variant under sustained load")
    a("--degrade-p99-budget-ms", type=float, help="with --degrade auto: OK-frame p99 budget (0 = shedding only)")
    a("--degrade-window-s", type=float, help="with --degrade auto: the load window, seconds (default 2)")
    a("--thermal-path", help="a file holding a temperature (or power) reading; at --thermal-limit: degrade")
    a("--thermal-limit", type=float, help="the reading at or above which the server degrades")
    a("--camera-priorities", help="comma-separated camera=class (critical, normal, best_effort); unlisted: normal")
    a("--kserve", action="store_const", const=True,
      help="also serve the KServe v2 (Open Inference Protocol) gRPC API, for Triton clients")
    a("--shm-allow", metavar="PREFIX",
      help="accept frames in shared memory from clients on this host (loopback or a unix socket), from "
           "/dev/shm segments named PREFIX* only (default: off)")
    a("--shm-max-open", type=int, help="shared-memory segments kept open at once (default 16)")
    a("--cameras", help="comma-separated allow-list of camera ids")
    a("--metric-cameras", help="comma-separated camera ids with their own metric label (others: 'other')")
    a("--max-streams", type=int, help="open StreamDetect calls in all (default 32)")
    a("--max-workers", type=int, help="gRPC handler threads for unary calls and health checks, beside one per "
      "stream (default 16)")
    a("--max-streams-per-peer", type=int, help="open StreamDetect calls per client address (default 8)")
    a("--stream-idle-timeout-s", type=float, help="end a stream that sent nothing this long (default 60)")
    a("--invalid-backoff-max-s", type=float,
      help="read a stream whose frames cannot be served slower, down to one request per this many s "
           "(default 1; 0 = off)")
    a("--max-undecoded-bytes", type=int, help="undecoded request bytes held in all (default 128 MiB)")
    a("--max-stream-undecoded-bytes", type=int, help="undecoded request bytes held per stream (default 64 MiB)")
    a("--max-stream-inflight-bytes", type=int, help="bytes a stream's unanswered frames hold (their requests, and "
      "the model outputs of those inferred) before it reads the next (default 4 MiB: a stream of bigger frames "
      "has one in the server at a time)")
    a("--max-unary-detect-calls", type=int, help="unary Detect (and KServe ModelInfer) calls at once, below "
      "--max-workers; one more is refused RESOURCE_EXHAUSTED (default: max workers less a quarter)")
    a("--decode-threads", type=int, help="concurrent decodes across all streams (default: one per core)")
    a("--max-image-pixels", type=int, help="largest frame accepted, in pixels")
    a("--max-full-buffer-pixels", type=int,
      help="largest progressive JPEG / PNG accepted, in pixels (default 1920x1080 = 2073600)")
    a("--grace-s", type=float, help="seconds to answer in-flight frames on SIGTERM")
    a("--log-format", choices=("text", "json"), help="log line format")
    a("--warmup-iters", type=int, help="warm-up inferences per batch size before SERVING")
    a("--engine-cache-dir", help="where TensorRT engines built on this device are cached")
    a("--build-engine-on-start", action="store_const", const=True, help="build a TensorRT engine if none fits")
    return p


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ exc when there is a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(fmt: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    formatter: logging.Formatter = (
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    for handler in root.handlers:
        handler.setFormatter(formatter)


def tune_malloc() -> None:
    """Cap glibc at 2 malloc arenas: a server with dozens of threads otherwise keeps freed
    per-frame buffers in per-thread arenas (8 cameras x 30 fps of 1080p JPEG: 490-537 MB RSS
    before, ~300 MB after, together with onnxruntime's arena off and uint8 queued frames).
    A fixed mmap threshold saved a little more memory but cost 5-9 ms per frame in page faults
    (StreamDetect p50 1.37-1.58x in-process instead of 1.09x), so it is not set. Set at 4 MiB
    (so that 16 MiB hostile frames are given back), it halved the peak memory of 32 streams of
    16 MiB frames but cut 4-camera throughput from 200 to 132 frames/s: batch inputs are above it.
    No-op where glibc is not the allocator.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        m_arena_max = -8
        libc.mallopt(m_arena_max, 2)
    except (OSError, AttributeError):
        log.debug("mallopt is not available; keeping the allocator's defaults")


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    from server.config import read_token_file

    flags = {k: v for k, v in vars(args).items() if k not in ("config", "admin_token_file")}
    if args.admin_token_file:
        flags["admin_tokens"] = read_token_file(args.admin_token_file, "--admin-token-file")
    return flags


# How long a SIGHUP reload waits for a load in progress (a degrade step, an admin load) instead
# of being refused: a fleet update's reload must not be lost. Not measured: over a TensorRT
# engine build on a Jetson (minutes).
RELOAD_WAIT_S = 900.0


def _reload(server: Any, manifest_path: str, variant: str) -> None:
    log.info("SIGHUP: loading %s", manifest_path)
    try:
        model = server.models.load_and_swap(manifest_path, variant, wait_s=RELOAD_WAIT_S)
    except Exception as exc:  # refused: logged with the reason, the served model goes on
        log.error("SIGHUP reload refused: %s", exc)
        return
    log.info("SIGHUP reload: now serving %s", model.describe())


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from server.config import load_config

    config = load_config(_flags(args), file=args.config)
    configure_logging(config.log_format)
    tune_malloc()

    from prometheus_client import CollectorRegistry

    from server.app import create_server
    from server.listen import grpc_address
    from server.metrics import start_metrics_http

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: shutting down (grace %.1f s)", signal.Signals(signum).name, config.grace_s)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    reload_requested = threading.Event()

    def on_hup(signum: int, _frame: Any) -> None:
        # As Unix daemons do: re-read the manifest path the server was started with.
        reload_requested.set()

    signal.signal(signal.SIGHUP, on_hup)

    registry = CollectorRegistry()
    http, metrics_port = start_metrics_http(registry, config.metrics_port, config.metrics_host)
    try:
        server, port = create_server(config, registry)
    except BaseException:
        http.shutdown()
        http.server_close()
        raise
    log.info("ready grpc=%s metrics=%s", grpc_address(config.host, port),
             grpc_address(config.metrics_host, metrics_port))
    try:
        while not stop.wait(0.5):
            if reload_requested.is_set():
                reload_requested.clear()
                threading.Thread(target=_reload, args=(server, config.model, config.variant), name="sighup-reload",
                                 daemon=True).start()
    finally:
        finished = server.shutdown(config.grace_s)
        http.shutdown()
        http.server_close()
    if not finished:
        log.warning("some calls were still running when the grace period ended")
    return 0
