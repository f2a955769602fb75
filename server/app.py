"""Wire the server: config -> backend -> scheduler -> servicer -> grpc.Server (+ health, reflection).

``create_server(config, registry)`` returns ``(server, port)``; ``server`` is a ``ManagedServer``
that behaves like a ``grpc.Server`` and also owns the scheduler and backend, so one
``server.shutdown(grace)`` stops accepting, answers in-flight frames and frees the engine.

Health (``grpc.health.v1``) says NOT_SERVING while the model loads and warms up, SERVING
after, and NOT_SERVING again from the moment shutdown begins. It also follows the engine:
after ``unhealthy_after_failed_batches`` failed batches in a row it says NOT_SERVING and the
backend is loaded anew in the background (again and again, backing off, until one loads); once
it is warm, or a batch succeeds, it says SERVING again.

Health, reflection and model info are unary calls outside the stream cap, on a thread pool
sized for every allowed stream plus ``max_workers``, so idle streams never lock them out.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from perception.decode import DecodeLimits
from perception.errors import ConfigError, ModelError
from perception.manifest import Manifest, Variant, load_manifest
from perception.pipeline import FramePipeline
from perception.tracking import TrackerConfig
from perception.v1 import detector_pb2 as pb
from server import convert
from server.config import ServerConfig
from server.health_service import OwnServicesHealth
from server.interceptors import ErrorInterceptor, TokenAuthInterceptor
from server.limits import ServiceLimits
from server.listen import bind, grpc_address
from server.metrics_protocol import NULL_METRICS, Metrics
from server.model_host import LifecycleLimits, ModelHost
from server.runtime.base import Backend
from server.runtime.factory import Availability, RuntimeSettings, backend_for, plan
from server.runtime.settings import resolve_arrangement, usable_cores
from server.runtime.tensorrt_engines import check_signed_engine_cache
from server.scheduler import Scheduler
from server.served_model import ServedModel, load_served_model
from server.service import DetectorService, add_detector_service
from server.shm import ShmReader
from server.trackers import Trackers

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Detector"].full_name
# A failed reload of a failing engine is tried again after 1 s, doubling up to 30 s: a device
# that comes back (a driver reset) is served again without a restart, and one that does not
# costs a load attempt every 30 s.
RELOAD_RETRY_FIRST_S = 1.0
RELOAD_RETRY_MAX_S = 30.0


class ManagedServer:
    """A started ``grpc.Server`` plus what it owns. Unknown attributes go to the grpc.Server."""

    def __init__(self, server: grpc.Server, port: int, scheduler: Scheduler, backend: Backend,
                 health_servicer: health.HealthServicer, metrics: Metrics,
                 ready: threading.Event, draining: threading.Event) -> None:
        self.grpc_server = server
        self.port = port
        self.scheduler = scheduler
        self.backend = backend
        self.health = health_servicer
        self.metrics = metrics
        self.ready = ready
        self.draining = draining
        self._stopped = threading.Event()
        self._failed_batches = 0
        self._recovering = False
        self._health_lock = threading.Lock()
        self.unhealthy_after = 3
        self.reload: Any = None  # () -> a new activated Backend, set by create_server
        self.engine_healthy = True
        self.limits: ServiceLimits | None = None  # the budgets every call shares (for inspection)
        self.trackers: Trackers | None = None  # the multi-object trackers, loaded on demand (for inspection)
        self.models: Any = None  # the ModelHost: what is served, swaps and rollbacks
        self.admin: grpc.Server | None = None
        self.degrader: Any = None
        self.admin_port = 0
        self.shm: ShmReader | None = None  # reads shared-memory frames (--shm-allow); closed at shutdown

    def on_batch(self, ok: bool) -> None:
        """Scheduler callback after every batch: health follows the engine."""
        with self._health_lock:
            if ok:
                self._failed_batches = 0
                if not self.engine_healthy:
                    self.engine_healthy = True
                    log.info("inference succeeds again: SERVING")
                    if not self.draining.is_set():
                        self.set_serving(True)
                return
            self._failed_batches += 1
            if self._failed_batches < self.unhealthy_after or self._recovering:
                return
            self.engine_healthy = False
            self._recovering = True
        log.error("%d inference batches failed in a row: NOT_SERVING, reloading the backend", self._failed_batches)
        self.set_serving(False)
        threading.Thread(target=self._recover, name="backend-reload", daemon=True).start()

    def model_changed(self) -> None:
        """Another model is served: the failure streak belonged to the one before. A probation
        rollback of a failing model used to leave the server NOT_SERVING until a batch
        succeeded, which needs a client that sends to a server saying NOT_SERVING."""
        with self._health_lock:
            self._failed_batches = 0
            if self.engine_healthy:
                return
            self.engine_healthy = True  # a reload still running replaces the backend of the model gone
        log.info("a new model is served: SERVING")
        if not self.draining.is_set():
            self.set_serving(True)

    def _recover(self) -> None:
        """Reload the served model's backend until one loads (or the server drains, or another
        model is served), then say SERVING: the new backend passed its warm-up inference, as a
        starting server's does. It used to wait for a client's batch to succeed, and a reload
        that failed was tried again only on the next failures: a server whose clients follow
        health (a Kubernetes readiness probe takes it out of its Service) got no batch, and
        stayed NOT_SERVING for good."""
        delay_s = RELOAD_RETRY_FIRST_S
        try:
            while self.reload is not None and not self.draining.is_set():
                model = self.models.current
                try:
                    new = self.reload(model)
                    # Under the host's lock: a model swapped out and dropped during the reload has
                    # the new backend freed there (it used to keep it for ever: the drop timer had
                    # freed the backend it replaced); one dropped later by its timer, which looks
                    # it up then.
                    old = self.models.replace_backend(model, new)
                except Exception:  # the next try may succeed (a device that comes back)
                    log.exception("reloading the backend failed; trying again in %g s", delay_s)
                    if self.draining.wait(delay_s):
                        return
                    delay_s = min(2 * delay_s, RELOAD_RETRY_MAX_S)
                    with self._health_lock:
                        if self.engine_healthy:  # another model is served now (model_changed)
                            return
                    continue
                if self.models.current is model:  # a rollback during the reload serves another model now
                    self.backend = new
                try:
                    old.deactivate()
                except Exception:  # the new backend serves all the same
                    log.exception("freeing the replaced backend failed")
                with self._health_lock:
                    self._failed_batches = 0
                    recovered, self.engine_healthy = not self.engine_healthy, True
                if recovered and not self.draining.is_set():
                    self.set_serving(True)
                log.info("backend reloaded and warm: SERVING")
                return
        finally:
            with self._health_lock:
                self._recovering = False
                self._failed_batches = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grpc_server, name)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def shutdown(self, grace_s: float) -> bool:
        """Stop accepting, answer in-flight frames, free the engine. True if done within grace."""
        if self._stopped.is_set():
            return True
        t0 = time.monotonic()
        self.draining.set()
        if self.models is not None:
            # First: a swap still loading (a SIGHUP reload, a degrade step the degrader's stop
            # does not wait out) is refused from now on, instead of completing after the models
            # are freed below.
            self.models.close()
        # NOT_SERVING for good: a later set() is ignored. A batch that recovered (or a model
        # swapped in) just before draining was set would otherwise say SERVING for the drain.
        self.health.enter_graceful_shutdown()
        if self.admin is not None:
            self.admin.stop(0)
        if self.degrader is not None:
            self.degrader.stop()
        done = self.grpc_server.stop(grace_s)
        finished = done.wait(grace_s + 1.0)
        self.scheduler.stop(timeout=max(0.5, grace_s - (time.monotonic() - t0)))
        if self.models is not None:
            self.models.deactivate_all()
        else:
            self.backend.deactivate()
        if self.shm is not None:
            self.shm.close()
        self._stopped.set()
        log.info("stopped in %.2f s%s", time.monotonic() - t0, "" if finished else " (grace period ran out)")
        return finished

    def stop(self, grace: float | None) -> threading.Event:
        """grpc.Server.stop semantics (returns an event), plus the scheduler and engine."""
        event = threading.Event()

        def run() -> None:
            self.shutdown(grace or 0.0)
            event.set()

        threading.Thread(target=run, name="server-shutdown", daemon=True).start()
        return event


def _warm_up(backend: Backend, pipeline: FramePipeline, iters: int, max_batch: int) -> None:
    """Run the engine at batch 1 and max batch so the first real frames pay no lazy-init cost."""
    spec = pipeline.spec
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, 255, (spec.input_height, spec.input_width, 3), dtype=np.uint8)
    x = pipeline.to_batch([canvas])
    for b in sorted({1, max_batch}):
        batch = np.repeat(x, b, axis=0)
        for _ in range(iters):
            pipeline.check_finite(backend.infer(batch))  # a model that computes only NaN does not start


def _reloader(settings: RuntimeSettings, preference: tuple[str, ...]) -> Any:
    """(served model) -> its variant on a freshly loaded backend, checked against its layout, warm."""

    def reload(model: ServedModel) -> Backend:
        backend, _ = backend_for(model.manifest, model.variant.name, settings, preference=preference)
        try:
            model.pipeline.bind_outputs(backend.outputs)
            _warm_up(backend, model.pipeline, 1, 1)
        except BaseException:
            backend.deactivate()
            raise
        return backend

    return reload


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls:
        return None
    try:
        key = Path(config.tls_key).read_bytes()
        cert = Path(config.tls_cert).read_bytes()
        ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    except OSError as exc:
        raise ConfigError(f"cannot read TLS files: {exc}") from exc
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def create_server(
    config: ServerConfig, registry: Any = None, metrics: Metrics | None = None
) -> tuple[ManagedServer, int]:
    """Build, bind and start the server; returns once the model is warm and health is SERVING.

    registry: a prometheus CollectorRegistry for the server's metrics (None = no metrics,
    unless ``metrics`` is given directly).
    Raises ModelError if the model fails its warm-up inference; whatever was started by then
    (the bound port, the scheduler, the engine) is stopped first.
    """
    if metrics is None and registry is not None:
        from server.metrics import ServerMetrics

        if config.metric_cameras or config.cameras:
            metrics = ServerMetrics(registry, cameras=frozenset(config.metric_cameras or config.cameras))
        else:
            # Any camera id may connect: bound the label values the ids become.
            from server.camera_labels import CameraLabelledMetrics, CameraLabels

            metrics = CameraLabelledMetrics(ServerMetrics(registry, cameras=None),
                                            CameraLabels(config.max_camera_labels))
    if metrics is None:
        metrics = NULL_METRICS
    monitor = None
    if config.degrade == "auto":
        from server.degrade import LoadMonitor, MonitoredMetrics

        monitor = LoadMonitor()
        metrics = MonitoredMetrics(metrics, monitor)
    def check_signature(path: str) -> bytes | None:
        """With --manifest-public-key, every model served is signed: at start, and each one a
        SIGHUP, the admin service or a degrade step loads. Returns the verified bytes, which the
        manifest is then parsed from (None without a key): a second read of the file could find
        an unsigned manifest put there after the check."""
        if not config.manifest_public_key:
            return None
        from server.runtime.signature import verify_manifest

        return verify_manifest(path, config.manifest_public_key)

    manifest = load_manifest(config.model, content=check_signature(config.model))
    limits = DecodeLimits(max_pixels=config.max_image_pixels, max_full_buffer_pixels=config.max_full_buffer_pixels)
    pipeline = FramePipeline.from_manifest(manifest, limits=limits)
    service_limits = ServiceLimits(config.max_undecoded_bytes, config.max_stream_undecoded_bytes,
                                   config.decode_threads, config.max_streams, config.max_streams_per_peer,
                                   config.stream_idle_timeout_s, config.priorities(),
                                   config.invalid_backoff_max_s, config.max_stream_inflight_bytes,
                                   max_unary_detect_calls=config.unary_detect_limit())
    ms = 1000
    options = [
        ("grpc.max_receive_message_length", config.message_limit()),
        ("grpc.max_send_message_length", config.message_limit()),
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),
        # Keepalive enforcement: ping idle connections, drop peers that ping more often than
        # allowed, and age connections out (with a grace for in-flight calls) so that streams
        # rebalance across replicas.
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * ms)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(config.min_client_ping_interval_s * ms)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_age_ms", int(config.max_connection_age_s * ms)),
        ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * ms)),
        # No bandwidth-delay probing: it grows each connection's receive window (and buffers) to
        # tens of MB for clients sending 16 MiB frames; a bench of 32 such streams peaked at
        # about half the memory without it (bench/bench_soak.py).
        ("grpc.http2.bdp_probe", 0),
    ]
    interceptors: list[grpc.ServerInterceptor] = []
    if config.auth_tokens:
        interceptors.append(TokenAuthInterceptor(config.auth_tokens, metrics))
    interceptors.append(ErrorInterceptor(metrics))
    if config.kserve:
        # KServe's methods live outside /perception.: their errors are mapped and counted the same way.
        interceptors.append(ErrorInterceptor(metrics, prefix="/inference.GRPCInferenceService/"))
    # No maximum_concurrent_rpcs: it counts every RPC, health checks included, so idle streams
    # would lock out liveness probes. Streams are capped by the servicer (ServiceLimits); the
    # pool has a thread for every allowed stream plus max_workers for unary calls and health.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_streams + config.max_workers, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=options,
    )
    health_servicer = OwnServicesHealth(("", SERVICE_NAME))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    creds = _credentials(config)
    port = bind(server, grpc_address(config.host, config.port), creds, "the gRPC server")

    managed_ready = threading.Event()
    draining = threading.Event()
    shm = ShmReader(config.shm_allow, limits, config.shm_max_open) if config.shm_allow else None
    trackers = Trackers(TrackerConfig(max_cameras=max(64, config.max_camera_labels)))
    service = DetectorService(
        pipeline, metrics, config.outbox_size, frozenset(config.cameras),
        ready=managed_ready.is_set, draining=draining.is_set, limits=service_limits,
        trackers=trackers, shm=shm,
    )
    add_detector_service(service, server)
    kserve: Any = None
    if config.kserve:
        from server.kserve import KServeService  # stubs from the vendored proto/kserve (make proto)

        kserve = KServeService(metrics, frozenset(config.cameras), ready=managed_ready.is_set,
                               draining=draining.is_set, limits=service_limits)
        kserve.add_to_server(server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
                                        + (("inference.GRPCInferenceService",) if kserve else ()), server)
    # Health answers NOT_SERVING (and Detect UNAVAILABLE) while the model loads and warms up.
    server.start()
    backend: Backend | None = None
    scheduler: Scheduler | None = None
    managed: ManagedServer | None = None
    try:
        # The arrangement depends on where the model will run: the first backend this machine offers.
        avail = Availability.detect()
        tries, _ = plan(config.backends, avail)
        planned_cpu = not tries or tries[0] == "onnxruntime-cpu"
        cores = usable_cores()
        threads, workers = resolve_arrangement(config.threads, config.inference_workers, cores, planned_cpu)
        settings = RuntimeSettings(
            threads=threads,
            max_batch=config.max_batch,
            engine_cache_dir=config.engine_cache_dir,
            build_engine_on_start=config.build_engine_on_start,
            engine_precision=config.engine_precision,
        )

        def load_backend(m: Manifest, v: str) -> tuple[Backend, Variant]:
            # The signature does not cover engines cached in the artifact's directory: with a key,
            # such a cache is refused where TensorRT could load from it (check_signed_engine_cache).
            if config.manifest_public_key and "tensorrt" in tries:
                check_signed_engine_cache(m, settings)
            return backend_for(m, v, settings, preference=config.backends, avail=avail)

        backend, variant = load_backend(manifest, config.variant)
        # Refuse a model whose outputs do not fit its declared layout now, not on the first frame.
        pipeline.bind_outputs(backend.outputs)
        max_batch = max(1, min(config.max_batch, backend.max_batch))
        on_cpu = backend.name.endswith("-cpu")
        if on_cpu != planned_cpu and not config.inference_workers:  # a GPU backend failed to load, or the reverse
            workers = resolve_arrangement(threads, 0, cores, on_cpu)[1]
        run_batch = max(1, min(config.inference_batch or (1 if on_cpu else max_batch), max_batch))
        log.info("inference on %s: %d run(s) at once of up to %d frame(s), %d intra-op thread(s) each, on %d core(s)",
                 backend.name, workers, run_batch, threads, cores)
        first = ServedModel(str(config.model), manifest, variant, backend, pipeline, max_batch)
        health_hook: list[ManagedServer] = []

        def on_batch(ok: bool, model: Any, seconds: float) -> None:
            if health_hook:
                server_ = health_hook[0]
                # Health follows the model served: a failed batch of one swapped or rolled out
                # (frames prepared for it before the change) is no failure of the one now served.
                if ok or model is None or model is server_.models.current:
                    server_.on_batch(ok)
                server_.models.observe(ok, model, seconds)

        scheduler = Scheduler(backend.infer, run_batch, config.max_wait_ms / 1000.0, config.queue_size,
                              config.max_pending, metrics, to_batch=pipeline.to_batch, on_batch=on_batch,
                              workers=workers)
        managed = ManagedServer(server, port, scheduler, backend, health_servicer, metrics,
                                ready=managed_ready, draining=draining)
        managed.unhealthy_after = config.unhealthy_after_failed_batches
        managed.limits = service_limits
        managed.shm = shm
        managed.trackers = trackers

        def load(path: str, name: str) -> ServedModel:
            # Each step first checks that the server is not shutting down (ModelHost.check_open):
            # a load running at shutdown stops at its next step, freeing the engine it loaded.
            def make(m: Manifest, v: str) -> tuple[Backend, Variant]:
                managed.models.check_open()
                return load_backend(m, v)

            def warm_up(b: Backend, p: FramePipeline, n: int) -> None:
                managed.models.check_open()
                _warm_up(b, p, config.warmup_iters, n)

            return load_served_model(path, name, make, lambda m: FramePipeline.from_manifest(m, limits=limits),
                                     warm_up, config.max_batch, manifest_bytes=check_signature(path))

        def changed(model: ServedModel, cause: str) -> None:
            try:
                managed.backend = model.backend
                service.attach(scheduler, convert.model_info(model.manifest, model.variant, model.backend.name,
                                                             model.max_batch, config.message_limit()), managed.models)
                metrics.set_model_info(model.manifest, model.variant.name, model.backend.name, model.loaded_at)
                managed.model_changed()
            finally:  # the degrader makes no move until it has heard of the change
                if managed.degrader is not None:
                    managed.degrader.model_changed(model, cause)

        managed.models = ModelHost(first, load, LifecycleLimits(probation_s=config.probation_s,
                                                                max_error_rate=config.probation_max_error_rate),
                                   on_change=changed, on_event=metrics.lifecycle_event)
        if monitor is not None:
            from server.degrade import DegradePolicy, Degrader

            managed.degrader = Degrader(managed.models, monitor, DegradePolicy(
                window_s=config.degrade_window_s, p99_budget_ms=config.degrade_p99_budget_ms,
                thermal_path=config.thermal_path, thermal_limit=config.thermal_limit), metrics)
        managed.reload = _reloader(settings, config.backends)
        health_hook.append(managed)
        service.attach(scheduler, convert.model_info(manifest, variant, backend.name, max_batch,
                                                     config.message_limit()), managed.models)
        if kserve is not None:
            host = managed.models
            kserve.attach(scheduler, lambda: host.current)
        t0 = time.monotonic()
        try:
            _warm_up(backend, pipeline, config.warmup_iters, max_batch)
        except Exception as exc:
            raise ModelError(f"model {manifest.name} {manifest.version} ({variant.name}) failed its warm-up "
                             f"inference on {backend.name}: {exc}") from exc
        if config.preload_tracker:  # before the server says it is ready: no tracked frame waits
            trackers.load()
        scheduler.start()
        metrics.set_model_info(manifest, variant.name, backend.name)
        if config.admin_port >= 0:
            # Only now: a LoadModel taken during the warm-up above was served, then the line
            # before wrote the first model's info over it; and a swap could free the first
            # model while it was still warming up, failing the start.
            from server.admin import start_admin_server

            managed.admin, managed.admin_port = start_admin_server(
                managed.models, grpc_address(config.admin_host, config.admin_port), config.admin_tokens, metrics, creds)
        if managed.degrader is not None:
            managed.degrader.start()
    except BaseException:
        # Nothing may outlive a failed start: the bound port, the scheduler, the engine.
        draining.set()
        server.stop(0).wait(5.0)
        if managed is not None and managed.admin is not None:
            managed.admin.stop(0)
        if scheduler is not None:
            scheduler.stop(timeout=1.0)
        if backend is not None:
            backend.deactivate()
        raise
    managed.ready.set()
    managed.set_serving(True)
    log.info("model %s %s (%s) on %s, max batch %d, warm in %.2f s",
             manifest.name, manifest.version, variant.name, backend.name, max_batch, time.monotonic() - t0)
    return managed, port
