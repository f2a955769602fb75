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
from typing import Sequence

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


def tensorrt_source(root: Path, variants: Sequence[Variant], source: Variant, precision: str) -> tuple[Path, str]:
    """The ONNX file TensorRT builds a ``precision`` engine of ``source`` from, and its sha256
    (``root``: the manifest's directory; ``variants``: all of its variants).

    Engines are built strongly typed (TensorRT 10.12 deprecated the FP16 / INT8 builder flags,
    11.x removed them), so the precision must already be in the graph:
    - fp32: the FP32 model itself;
    - fp16: the FP16 model (the variant itself, or the FP16 sibling of an FP32 variant:
      ``fp32`` -> ``fp16``), whose IO and box decode stay FP32;
    - int8: not the variant's own file, onnxruntime's model with U8 activations and fitted zero
      points, which TensorRT's explicit quantization rejects, but the signed, zero-point-0
      twin the build writes beside it (``extra["tensorrt_qdq"]``), checked against its hash.
    """
    if precision == "int8":
        qdq = source.extra.get("tensorrt_qdq") if isinstance(source.extra, dict) and source.precision == "int8" else None
        if not isinstance(qdq, dict) or not qdq.get("file"):
            raise ModelError(
                f"variant {source.name!r} has no TensorRT Q/DQ model (signed INT8, zero points 0): TensorRT cannot "
                "build an INT8 engine from it; use an INT8 variant of a current `perception build`"
            )
        gate = qdq.get("gate")
        if isinstance(gate, dict) and gate.get("passed") is False:
            raise ModelError(f"the TensorRT Q/DQ model of variant {source.name!r} failed its accuracy gate at build "
                             f"time ({gate.get('reason', '')}); no INT8 engine is built from it")
        path = root / str(qdq["file"])
        if not path.is_file():
            raise ModelError(f"{path}: the TensorRT Q/DQ model of variant {source.name!r} is missing")
        digest = sha256_file(path)
        if qdq.get("sha256") and digest != qdq["sha256"]:
            raise ModelError(f"{path}: sha256 does not match the manifest (corrupt or replaced file)")
        return path, digest
    if precision == "fp16" and source.precision == "fp32":
        twin = source.name[: -len("fp32")] + "fp16" if source.name.endswith("fp32") else ""
        match = [v for v in variants if v.name == twin and v.format == "onnx" and v.precision == "fp16"]
        if not match:
            raise ModelError(f"no FP16 ONNX model of variant {source.name!r} to build a strongly typed FP16 engine "
                             "from; build with --precisions fp32,fp16,... or use engine_precision fp32")
        source = match[0]
    if source.precision != precision:
        raise ModelError(f"cannot build a TensorRT {precision} engine from the {source.precision} variant {source.name!r}")
    path = root / source.file
    return path, source.sha256 or sha256_file(path)


def engine_source_sha(manifest: Manifest, engine: Variant, source: Variant) -> str:
    """The ONNX hash a shipped engine variant must have been built from: the one recorded in
    its fingerprint, else that of the file ``tensorrt_source`` would build it from."""
    recorded = engine.extra.get("fingerprint", {}) if isinstance(engine.extra, dict) else {}
    if recorded.get("onnx_sha256"):
        return str(recorded["onnx_sha256"])
    return tensorrt_source(manifest.path_of(source).parent, manifest.variants, source, engine.precision)[1]


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
    root = m.path_of(source).parent
    build_from: Path | None = None
    if named.format == "tensorrt":
        precision, engine = named.precision, m.path_of(named)
        variant = named
        # The source file itself is only resolved if this device must rebuild the engine.
        onnx_sha = engine_source_sha(m, named, source)
    else:
        precision = req.engine_precision if source.precision == "fp32" else source.precision
        build_from, onnx_sha = tensorrt_source(root, m.variants, source, precision)
        # A shipped engine of exactly this ONNX file, if the build made one.
        engines = [
            v for v in m.variants
            if v.format == "tensorrt" and v.precision == precision and isinstance(v.extra, dict)
            and v.extra.get("fingerprint", {}).get("onnx_sha256") == onnx_sha
        ]
        variant = engines[0] if engines else source
        engine = m.path_of(engines[0]) if engines else None
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

        if build_from is None:
            build_from, source_sha = tensorrt_source(root, m.variants, source, precision)
            if source_sha != onnx_sha:
                raise ModelError(f"{build_from.name} is not the ONNX model engine {named.file} was built from")
        build_engine(
            build_from, cached, BuildOptions(precision, batch, timing_cache=str(cache / wanted.timing_cache_name())), wanted
        )
    return TensorRTBackend(cached, wanted, batch), variant
