"""Which TensorRT engine serves a manifest variant on this device, built and cached if allowed.

A shipped engine variant is used when its fingerprint fits this device; otherwise (and for an
ONNX variant) an engine is looked up in, or built into, the engine cache, whose file name
encodes the fingerprint, so a TensorRT upgrade or another GPU gets its own engine instead of a
refused one. TensorRT itself is imported lazily by the backend and builder modules.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from perception.errors import ModelError
from perception.manifest import Manifest, Precision, Variant, VariantFormat, check_file, read_checked
from server.runtime.settings import RuntimeSettings

if TYPE_CHECKING:
    from server.runtime.base import Backend

log = logging.getLogger(__name__)


def engine_source_sha(engine: Variant) -> str:
    """The ONNX hash a shipped engine variant was built from, as its manifest declares it."""
    if engine.source is None:
        raise ModelError(f"TensorRT variant {engine.name!r} declares no source ONNX file")
    return engine.source.sha256


def load_tensorrt(m: Manifest, named: Variant, s: RuntimeSettings) -> tuple[Backend, Variant]:
    from server.runtime.fingerprint import check_engine, device_fingerprint, dynamic_input_size
    from server.runtime.tensorrt_backend import TensorRTBackend

    source = m.onnx_of(named)
    build_from: Path | None = None
    engine: Path | None
    engine_sha = ""  # a shipped engine's hash in the manifest: its plan is loaded from the bytes hashed
    if named.format is VariantFormat.TENSORRT:
        precision, engine, variant = named.precision, m.path_of(named), named
        engine_sha = named.sha256
        # The source file itself is only resolved if this device must rebuild the engine.
        onnx_sha = engine_source_sha(named)
    else:
        precision = Precision(s.engine_precision) if source.precision is Precision.FP32 else source.precision
        build_from, onnx_sha = tensorrt_source(m, source, precision)
        # A shipped engine of exactly this ONNX file, if the build made one.
        shipped = [v for v in m.variants if v.format is VariantFormat.TENSORRT and v.precision is precision
                   and v.engine is not None and v.engine.onnx_sha256 == onnx_sha]
        variant = shipped[0] if shipped else source
        engine = m.path_of(shipped[0]) if shipped else None
        engine_sha = shipped[0].sha256 if shipped else ""
    batch = min(s.max_batch, variant.max_batch)
    pre = m.preprocess
    wanted = device_fingerprint(precision.value, onnx_sha, batch,
                                input_size=dynamic_input_size(source.input_shape, pre.input_width, pre.input_height))
    if engine is not None:
        try:
            check_engine(engine, wanted)
            return TensorRTBackend(engine, wanted, batch, sha256=engine_sha), variant
        except ModelError:
            if not s.build_engine_on_start:
                raise
            log.warning("engine %s does not fit this device; building one", engine.name)
    cache = engine_cache_dir(m, s)
    cached = cache / wanted.cache_name()
    if not cached.is_file():
        if not s.build_engine_on_start:
            raise ModelError(
                f"no TensorRT engine for variant {source.name!r} ({precision.value}); "
                "enable build_engine_on_start to build and cache one on this device"
            )
        from server.runtime.tensorrt_builder import BuildOptions, build_engine

        if build_from is None:
            build_from, source_sha = tensorrt_source(m, source, precision)
            if source_sha != onnx_sha:
                raise ModelError(f"{build_from.name} is not the ONNX model engine {named.file} was built from")
        # Built from the bytes hashed (the engine is cached under that hash), not from a second
        # read of the file, which could find another model there.
        onnx = read_checked(build_from, onnx_sha, "TensorRT's ONNX source")
        build_engine(build_from, cached,
                     BuildOptions(precision.value, batch, timing_cache=str(cache / wanted.timing_cache_name()),
                                  input_height=pre.input_height, input_width=pre.input_width), wanted,
                     onnx_bytes=onnx)
    return TensorRTBackend(cached, wanted, batch), variant


def engine_cache_dir(m: Manifest, s: RuntimeSettings) -> Path:
    """Where the engines TensorRT builds on this device for ``m`` are cached: ``engine_cache_dir``,
    or by default the artifact's ``engines/`` directory."""
    return Path(s.engine_cache_dir) if s.engine_cache_dir else (m.root or Path(".")) / "engines"


def check_signed_engine_cache(m: Manifest, s: RuntimeSettings) -> None:
    """ModelError if the engine cache for ``m`` is inside its artifact directory (the default is).

    For a server with a manifest public key: the signature covers the files the manifest names,
    and a cached engine is not one of them (its name encodes the device). Whoever can deliver an
    artifact could put an engine of the expected name in its ``engines/``, loaded after a check
    of its fingerprint alone. Refused, not rebuilt at every start, which takes minutes on a
    Jetson: the cache belongs where the deliverer cannot write (the deploy configs set one)."""
    root = (m.root or Path(".")).resolve()
    cache = engine_cache_dir(m, s).resolve()
    if cache.is_relative_to(root):
        raise ModelError(f"the TensorRT engine cache {cache} is inside the artifact directory {root}: the "
                         "manifest's signature does not cover engines cached there; set engine_cache_dir "
                         "(--engine-cache-dir) to a directory outside it")


def tensorrt_source(manifest: Manifest, source: Variant, precision: Precision) -> tuple[Path, str]:
    """The ONNX file TensorRT builds a ``precision`` engine of ``source`` from, and its sha256.

    Engines are built strongly typed (TensorRT 10.12 deprecated the FP16 / INT8 builder flags,
    11.x removed them), so the precision must already be in the graph:
    - fp32: the FP32 model itself;
    - fp16: the FP16 model of the same family (the variant itself, or its FP16 sibling);
    - int8: not the variant's own file, onnxruntime's model with U8 activations and fitted zero
      points, which TensorRT's explicit quantization rejects, but the signed, zero-point-0
      twin the build declared in ``tensorrt_qdq``, checked against its hash.
    """
    if manifest.root is None:
        raise ModelError("manifest was not loaded from a directory")
    if precision is Precision.INT8:
        qdq = source.tensorrt_qdq if source.precision is Precision.INT8 else None
        if qdq is None:
            raise ModelError(
                f"variant {source.name!r} has no TensorRT Q/DQ model (signed INT8, zero points 0): TensorRT cannot "
                "build an INT8 engine from it; use an INT8 variant of a current `perception build`"
            )
        if not qdq.passed:
            raise ModelError(f"the TensorRT Q/DQ model of variant {source.name!r} failed its accuracy gate at build "
                             f"time ({qdq.gate.get('reason', '')}); no INT8 engine is built from it")
        path = check_file(manifest.root, qdq.file, qdq.sha256, f"TensorRT Q/DQ model of {source.name!r}")
        return path, qdq.sha256
    if precision is Precision.FP16 and source.precision is Precision.FP32:
        twin = manifest.sibling(source, Precision.FP16)
        if twin is None:
            raise ModelError(f"no FP16 ONNX model of variant {source.name!r} to build a strongly typed FP16 engine "
                             "from; build with --precisions fp32,fp16,... or use engine_precision fp32")
        source = twin
    if source.precision is not precision:
        raise ModelError(f"cannot build a TensorRT {precision.value} engine from the {source.precision.value} "
                         f"variant {source.name!r}")
    return check_file(manifest.root, source.file, source.sha256, f"variant {source.name!r}"), source.sha256
