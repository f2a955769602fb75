"""TensorRT engines as manifest variants, built and gated on a device with an NVIDIA GPU.

Split from ``build_engine.build`` (which calls it when ``tensorrt_available()``); it uses the
server's own builder and backend, imported lazily so a CPU-only install imports cleanly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from perception.errors import ModelError
from perception.manifest import PostprocessSpec, PreprocessSpec, Variant, sha256_file

if TYPE_CHECKING:
    from build_engine.build import BuildOptions


def build_tensorrt_variants(staging: Path, variants: list[Variant], fp32: Any, valset: Any, pre: PreprocessSpec,
                            post: PostprocessSpec, opts: "BuildOptions", progress: Callable[[str], None]) -> list[Variant]:
    """TensorRT engines with the server's builder (the code the device runs on first start),
    strongly typed: FP16 from the FP16 ONNX, INT8 from the INT8 model's signed, zero-point-0
    Q/DQ twin; batch profile 1..max_batch; a timing cache beside them. Each engine is a
    ``format="tensorrt"`` variant naming its ONNX source, gated like the others (through the
    server's TensorRT backend) against the FP32 result."""
    from build_engine.gate import run_gate
    from server.runtime.factory import tensorrt_source
    from server.runtime.fingerprint import device_fingerprint
    from server.runtime.tensorrt_backend import TensorRTBackend
    from server.runtime.tensorrt_builder import BuildOptions as TrtOptions
    from server.runtime.tensorrt_builder import build_engine

    engines: dict[str, tuple[Path, Variant, Any]] = {}
    for v in variants:
        # Strongly typed builds: FP16 from the FP16 model, INT8 from the INT8 model's TensorRT twin.
        precision = v.precision
        if v.format != "onnx" or precision not in ("fp16", "int8"):
            continue
        if precision == "int8" and "tensorrt_qdq" not in v.extra:
            progress(f"no TensorRT Q/DQ model of {v.name} (--no-tensorrt-qdq): skipping its TensorRT engine")
            continue
        try:
            onnx_file, onnx_sha = tensorrt_source(staging, variants, v, precision)
        except ModelError as exc:  # e.g. a twin that failed its accuracy gate
            progress(f"skipping the TensorRT engine of {v.name}: {exc}")
            continue
        fp = device_fingerprint(precision, onnx_sha, opts.max_batch)
        engine = staging / fp.cache_name()
        progress(f"building TensorRT {precision} engine from {onnx_file.name}")
        build_engine(onnx_file, engine, TrtOptions(precision, opts.max_batch, timing_cache=str(staging / fp.timing_cache_name())), fp)
        engines[f"trt_{v.name}"] = (engine, v, fp)

    def factory(name: str, path: Path) -> Any:
        b = TensorRTBackend(path, engines[name][2], opts.max_batch)
        b.activate()
        return b

    limits = {n: opts.gates.limits(n) for n in engines}
    results = run_gate({n: e[0] for n, e in engines.items()}, limits, valset, pre, post, opts.latency_runs,
                       opts.threads, reference=fp32, factory=factory, progress=progress)
    out = []
    for name, (engine, src, fp) in engines.items():
        r = results[name]
        out.append(dataclasses.replace(
            src, name=name, file=engine.name, precision=fp.precision, format="tensorrt", sha256=sha256_file(engine),
            metrics=r.metrics, latency_ms=r.latency_ms, parity=r.parity, gate=r.gate,
            extra={**{k: v for k, v in src.extra.items() if k != "tensorrt_qdq"}, "onnx_variant": src.name,
                   "fingerprint": dataclasses.asdict(fp)},
        ))
    return out
