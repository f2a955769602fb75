"""Choose and load a runtime by config, with a fallback order.

``plan`` is pure: given the preference order and what this machine offers, it says which
backends to try and why the others are skipped. ``create_backend`` then tries them in order
(a backend that fails to load falls through to the next, with a logged reason).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

from perception.errors import ModelError
from perception.manifest import Manifest, Variant, sha256_file
from server.runtime.base import Backend
from server.runtime.onnxruntime_backend import PROVIDERS, OnnxRuntimeBackend, available_providers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Availability:
    """What this machine can run."""

    tensorrt: bool
    ort_providers: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def detect(cls) -> "Availability":
        has_trt = importlib.util.find_spec("tensorrt") is not None
        return cls(tensorrt=has_trt, ort_providers=frozenset(available_providers()))


def plan(preference: tuple[str, ...], avail: Availability) -> tuple[list[str], dict[str, str]]:
    """(backends to try in order, {skipped backend: reason})."""
    tries: list[str] = []
    skipped: dict[str, str] = {}
    for name in preference:
        if name == "tensorrt":
            if avail.tensorrt:
                tries.append(name)
            else:
                skipped[name] = "the tensorrt package is not installed"
        elif name in PROVIDERS:
            provider = PROVIDERS[name][0]
            if provider in avail.ort_providers:
                tries.append(name)
            else:
                skipped[name] = f"onnxruntime has no {provider}"
        else:
            skipped[name] = "unknown backend"
    return tries, skipped


@dataclass(frozen=True)
class BackendRequest:
    """What to load: the manifest, the variant name ('' = default) and runtime settings."""

    manifest: Manifest
    variant: str = ""
    preference: tuple[str, ...] = ("onnxruntime-cpu",)
    threads: int = 2
    max_batch: int = 8
    engine_cache_dir: str = ""
    build_engine_on_start: bool = False
    engine_precision: str = "fp16"


def onnx_variant(manifest: Manifest, name: str = "") -> Variant:
    """The ONNX variant to run: the named one, or the source ONNX of a named TensorRT variant."""
    v = manifest.variant(name or None)
    if v.format == "onnx":
        return v
    source = v.extra.get("onnx_variant") if isinstance(v.extra, dict) else None
    if source:
        return manifest.variant(str(source))
    onnx = [x for x in manifest.variants if x.format == "onnx" and x.precision == v.precision]
    if not onnx:
        onnx = [x for x in manifest.variants if x.format == "onnx"]
    if not onnx:
        raise ModelError(f"manifest has no ONNX variant to fall back to from {v.name!r}")
    return onnx[0]


def tensorrt_source(manifest: Manifest, source: Variant) -> tuple[Path, str]:
    """The ONNX file TensorRT builds an engine of ``source`` from, and its sha256.

    FP32 / FP16 variants are their own source. An INT8 variant's own file is onnxruntime's
    model (U8 activations with fitted zero points), which TensorRT's explicit quantization
    rejects; the build writes a signed, zero-point-0 twin of it, named in
    ``extra["tensorrt_qdq"]``, and that is the one built (and checked against its hash).
    """
    if source.precision != "int8":
        path = manifest.path_of(source)
        return path, source.sha256 or sha256_file(path)
    qdq = source.extra.get("tensorrt_qdq") if isinstance(source.extra, dict) else None
    if not isinstance(qdq, dict) or not qdq.get("file"):
        raise ModelError(
            f"variant {source.name!r} has no TensorRT Q/DQ model (signed INT8, zero points 0): TensorRT cannot "
            "build its onnxruntime U8 model; rebuild with a current `perception build`"
        )
    path = manifest.path_of(source).parent / str(qdq["file"])
    if not path.is_file():
        raise ModelError(f"{path}: the TensorRT Q/DQ model of variant {source.name!r} is missing")
    digest = sha256_file(path)
    if qdq.get("sha256") and digest != qdq["sha256"]:
        raise ModelError(f"{path}: sha256 does not match the manifest (corrupt or replaced file)")
    return path, digest


def create_backend(req: BackendRequest, avail: Availability | None = None) -> tuple[Backend, Variant]:
    """Load the first backend of the preference order that works here; activated and ready."""
    avail = avail or Availability.detect()
    tries, skipped = plan(req.preference, avail)
    for name, why in skipped.items():
        log.info("backend %s skipped: %s", name, why)
    errors: list[str] = []
    for name in tries:
        try:
            backend, variant = _load(name, req)
            backend.activate()
        except ModelError as exc:
            log.warning("backend %s failed, trying the next: %s", name, exc)
            errors.append(f"{name}: {exc}")
            continue
        log.info("using backend %s for variant %s", backend.name, variant.name)
        return backend, variant
    reasons = errors + [f"{n}: {w}" for n, w in skipped.items()]
    raise ModelError("no inference backend could be loaded: " + " | ".join(reasons))


def _load(name: str, req: BackendRequest) -> tuple[Backend, Variant]:
    m = req.manifest
    if name != "tensorrt":
        v = onnx_variant(m, req.variant)
        batch = min(req.max_batch, v.max_batch)
        return OnnxRuntimeBackend(m.path_of(v), PROVIDERS[name], req.threads, batch), v
    return _load_tensorrt(req)


def _load_tensorrt(req: BackendRequest) -> tuple[Backend, Variant]:
    from server.runtime.fingerprint import check_engine, device_fingerprint
    from server.runtime.tensorrt_backend import TensorRTBackend

    m = req.manifest
    named = m.variant(req.variant or None)
    source = onnx_variant(m, req.variant)
    if named.format == "tensorrt":
        precision, engine = named.precision, m.path_of(named)
        variant = named
    else:
        precision = req.engine_precision if source.precision == "fp32" else source.precision
        engines = [
            v for v in m.variants
            if v.format == "tensorrt" and v.precision == precision
            and (not isinstance(v.extra, dict) or v.extra.get("onnx_variant", source.name) == source.name)
        ]
        variant = engines[0] if engines else source
        engine = m.path_of(engines[0]) if engines else None
    build_from, onnx_sha = tensorrt_source(m, source)
    batch = min(req.max_batch, variant.max_batch)
    wanted = device_fingerprint(precision, onnx_sha, batch)
    if engine is not None:
        try:
            check_engine(engine, wanted)
            return TensorRTBackend(engine, wanted, batch), variant
        except ModelError:
            if not req.build_engine_on_start:
                raise
            log.warning("engine %s does not fit this device; building one", engine.name, exc_info=False)
    # Build-and-cache: the cache file name encodes the fingerprint, so a TensorRT upgrade or a
    # different GPU gets its own engine instead of a refused one.
    cache = Path(req.engine_cache_dir) if req.engine_cache_dir else (m.root or Path(".")) / "engines"
    cached = cache / wanted.cache_name()
    if not cached.is_file():
        if not req.build_engine_on_start:
            raise ModelError(
                f"no TensorRT engine for variant {source.name!r} ({precision}); "
                "enable build_engine_on_start to build and cache one on this device"
            )
        from server.runtime.tensorrt_builder import BuildOptions, build_engine

        build_engine(
            build_from, cached, BuildOptions(precision, batch, timing_cache=str(cache / "timing.cache")), wanted
        )
    return TensorRTBackend(cached, wanted, batch), variant
