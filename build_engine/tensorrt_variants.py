"""TensorRT engines as manifest variants, built and gated on a device with an NVIDIA GPU.

Split from ``build_engine.build`` (which calls it when ``tensorrt_available()``); it uses the
server's own builder and backend, imported lazily so a CPU-only install imports cleanly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from build_engine.thresholds import GateThresholds
from perception.errors import ModelError
from perception.manifest import (
    EngineRecord,
    Manifest,
    PostprocessSpec,
    Precision,
    PreprocessSpec,
    SourceFile,
    Variant,
    VariantFormat,
    sha256_file,
)


def build_tensorrt_variants(staging: Path, variants: list[Variant], fp32: Any, valset: Any, pre: PreprocessSpec,
                            post: PostprocessSpec, gates: GateThresholds, max_batch: int, latency_runs: int,
                            threads: int, progress: Callable[[str], None], classes: Sequence[str]) -> list[Variant]:
    """TensorRT engines with the server's builder (the code the device runs on first start),
    strongly typed: FP16 from the FP16 ONNX, INT8 from the INT8 model's signed, zero-point-0
    Q/DQ twin; batch profile 1..max_batch; a timing cache beside them. Each engine is a
    ``format="tensorrt"`` variant whose parent is its ONNX variant and whose ``source`` is the
    exact file it was built from, gated like its parent (through the server's TensorRT
    backend) against the FP32 result, on accuracy and the latency budget (not on a latency
    ratio to FP32, which was timed on the CPU)."""
    from build_engine.gate import run_gate
    from server.runtime.fingerprint import device_fingerprint, dynamic_input_size
    from server.runtime.tensorrt_backend import TensorRTBackend
    from server.runtime.tensorrt_builder import BuildOptions as TrtOptions
    from server.runtime.tensorrt_builder import build_engine
    from server.runtime.tensorrt_engines import tensorrt_source

    staged = Manifest("staging", "0", tuple(classes), pre, post, tuple(variants), variants[0].name, root=staging)
    engines: dict[str, tuple[Path, Variant, Any, Path]] = {}
    for v in variants:
        if v.format is not VariantFormat.ONNX or v.precision not in (Precision.FP16, Precision.INT8):
            continue
        if v.precision is Precision.INT8 and v.tensorrt_qdq is None:
            progress(f"no TensorRT Q/DQ model of {v.name} (--no-tensorrt-qdq): skipping its TensorRT engine")
            continue
        try:
            onnx_file, onnx_sha = tensorrt_source(staged, v, v.precision)
        except ModelError as exc:  # e.g. a twin that failed its accuracy gate
            progress(f"skipping the TensorRT engine of {v.name}: {exc}")
            continue
        fp = device_fingerprint(v.precision.value, onnx_sha, max_batch,
                                input_size=dynamic_input_size(v.input_shape, pre.input_width, pre.input_height))
        engine = staging / fp.cache_name()
        progress(f"building TensorRT {v.precision.value} engine from {onnx_file.name}")
        build_engine(onnx_file, engine, TrtOptions(v.precision.value, max_batch,
                                                   timing_cache=str(staging / fp.timing_cache_name()),
                                                   input_height=pre.input_height, input_width=pre.input_width), fp)
        engines[f"trt_{v.name}"] = (engine, v, fp, onnx_file)

    def factory(name: str, path: Path) -> Any:
        b = TensorRTBackend(path, engines[name][2], max_batch)
        b.activate()
        return b

    # Accuracy against the FP32 result, and the p95 budget; no latency ratio: FP32's latency was
    # timed on onnxruntime's CPU, and any GPU engine is a small fraction of it, so the ratio
    # would pass every engine whatever its speed (no FP32 engine is built to time it against).
    limits = {n: dataclasses.replace(gates.limits(e[1].family, e[1].precision), max_latency_ratio=None)
              for n, e in engines.items()}
    results = run_gate({n: e[0] for n, e in engines.items()}, limits, valset, pre, post, latency_runs,
                       threads, reference=fp32, factory=factory, progress=progress)
    out = []
    for name, (engine, src, fp, onnx_file) in engines.items():
        r = results[name]
        out.append(dataclasses.replace(
            src, name=name, file=engine.name, precision=Precision(fp.precision), format=VariantFormat.TENSORRT,
            sha256=sha256_file(engine), parent=src.name, tensorrt_qdq=None,
            source=SourceFile(onnx_file.name, sha256_file(onnx_file)),
            engine=EngineRecord(**dataclasses.asdict(fp)),
            metrics=r.metrics, latency_ms=r.latency_ms, parity=r.parity, gate=r.gate,
        ))
    return out
