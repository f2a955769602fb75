"""Make the backend for a manifest variant: the one place a runtime is chosen and loaded.

Every caller that runs a model (the server, the build gate, evaluation, ``verify-engine``,
the benchmarks) goes through ``backend_for`` (a manifest variant) or ``open_backend`` (a file
being built, before its manifest exists). Loaders are a registry: a backend is one module
plus one line in ``LOADERS``.

``plan`` is pure: given the preference order and what this machine offers, it says which
backends to try and why the others are skipped; ``backend_for`` tries them in order (a
backend that fails to load falls through to the next, with a logged reason).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from perception.errors import ModelError
from perception.manifest import Manifest, Variant
from server.runtime.availability import tensorrt_installed
from server.runtime.base import Backend
from server.runtime.onnxruntime_backend import PROVIDERS, OnnxRuntimeBackend, available_providers
from server.runtime.settings import RuntimeSettings

__all__ = ["LOADERS", "Availability", "RuntimeSettings", "backend_for", "open_backend", "plan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Availability:
    """What this machine can run."""

    tensorrt: bool
    ort_providers: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def detect(cls) -> Availability:
        has_trt = tensorrt_installed()
        return cls(tensorrt=has_trt, ort_providers=frozenset(available_providers()))

    def missing(self, backend: str) -> str:
        """Why ``backend`` cannot run here ('' if it can)."""
        if backend == "tensorrt":
            return "" if self.tensorrt else "the tensorrt package is not installed"
        if backend in PROVIDERS:
            provider = PROVIDERS[backend][0]
            return "" if provider in self.ort_providers else f"onnxruntime has no {provider}"
        return "unknown backend"


# A loader: (manifest, requested variant, settings) -> (unactivated backend, the variant it runs).
Loader = Callable[[Manifest, Variant, RuntimeSettings], tuple[Backend, Variant]]


def _ort_loader(name: str) -> Loader:
    def load(m: Manifest, v: Variant, s: RuntimeSettings) -> tuple[Backend, Variant]:
        onnx = m.onnx_of(v)
        # With the manifest's sha256 the session is made from the bytes hashed, not the path reopened.
        return OnnxRuntimeBackend(m.path_of(onnx), PROVIDERS[name], s.threads, min(s.max_batch, onnx.max_batch),
                                  sha256=onnx.sha256), onnx

    return load


def _tensorrt_loader(m: Manifest, v: Variant, s: RuntimeSettings) -> tuple[Backend, Variant]:
    from server.runtime.tensorrt_engines import load_tensorrt

    return load_tensorrt(m, v, s)


LOADERS: dict[str, Loader] = {
    "onnxruntime-cpu": _ort_loader("onnxruntime-cpu"),
    "onnxruntime-cuda": _ort_loader("onnxruntime-cuda"),
    "onnxruntime-tensorrt": _ort_loader("onnxruntime-tensorrt"),
    "tensorrt": _tensorrt_loader,
}


def plan(preference: tuple[str, ...], avail: Availability) -> tuple[list[str], dict[str, str]]:
    """(backends to try in order, {skipped backend: reason})."""
    tries: list[str] = []
    skipped: dict[str, str] = {}
    for name in preference:
        why = avail.missing(name) if name in LOADERS else "unknown backend"
        if why:
            skipped[name] = why
        else:
            tries.append(name)
    return tries, skipped


def backend_for(
    manifest: Manifest, variant: str = "", settings: RuntimeSettings | None = None,
    preference: tuple[str, ...] = ("onnxruntime-cpu",), avail: Availability | None = None,
) -> tuple[Backend, Variant]:
    """The first backend of ``preference`` that loads ``variant`` ('' = default) here; activated."""
    settings = settings or RuntimeSettings()
    wanted = manifest.variant(variant or None)
    tries, skipped = plan(preference, avail or Availability.detect())
    for name, why in skipped.items():
        # The first choice missing is worth a warning: a GPU image serving on the CPU is
        # otherwise found only by its latency.
        (log.warning if name == preference[0] else log.info)("backend %s skipped: %s", name, why)
    errors: list[str] = []
    for name in tries:
        try:
            backend, loaded = LOADERS[name](manifest, wanted, settings)
            backend.activate()
        except ModelError as exc:
            log.warning("backend %s failed, trying the next: %s", name, exc)
            errors.append(f"{name}: {exc}")
            continue
        log.info("using backend %s for variant %s", backend.name, loaded.name)
        return backend, loaded
    reasons = errors + [f"{n}: {w}" for n, w in skipped.items()]
    raise ModelError("no inference backend could be loaded: " + " | ".join(reasons))


def open_backend(path: Path, settings: RuntimeSettings | None = None) -> Backend:
    """An activated onnxruntime CPU backend for an ONNX file that has no manifest yet (the
    build stage scoring what it is about to ship; ``perception eval --onnx``)."""
    settings = settings or RuntimeSettings()
    backend = OnnxRuntimeBackend(path, PROVIDERS["onnxruntime-cpu"], settings.threads, settings.max_batch)
    backend.activate()
    return backend
