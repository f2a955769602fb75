"""What a TensorRT engine was built for, and the refusal to load it anywhere else.

A serialized engine only runs on the TensorRT version and GPU architecture that built it, and
it embodies one ONNX file at one precision. The build writes ``<engine>.fingerprint.json``
beside the engine; before loading, the server compares it with this device and the manifest
and refuses a mismatch with a message that says what differs and what to do.

Only ``device_fingerprint`` touches TensorRT / CUDA, lazily; the rest is pure and unit-tested.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from perception.errors import ModelError


@dataclass(frozen=True)
class EngineFingerprint:
    tensorrt_version: str  # e.g. "10.3.0"
    compute_capability: str  # e.g. "8.7" (Orin), "8.9" (Ada)
    precision: str  # fp32 / fp16 / int8
    onnx_sha256: str  # of the ONNX file the engine was built from
    max_batch: int
    device_name: str = ""  # informational only; not compared
    # WxH the engine's optimisation profile was built for, when the ONNX leaves the input's
    # height or width dynamic (an import with --input-size): the same file at another size is
    # another engine. "" when the ONNX fixes the size (its sha256 says it all).
    input_size: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EngineFingerprint:
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelError(f"engine fingerprint is malformed: {exc}") from exc

    def cache_name(self) -> str:
        """A file name unique to everything that makes an engine incompatible."""
        key = f"{self.tensorrt_version}|{self.compute_capability}|{self.precision}|{self.onnx_sha256}|{self.max_batch}"
        if self.input_size:  # a fixed-size model's name stays what it was: no rebuild on upgrade
            key += f"|{self.input_size}"
        return f"model.{self.precision}.b{self.max_batch}.{hashlib.sha256(key.encode()).hexdigest()[:16]}.engine"

    def timing_cache_name(self) -> str:
        """Timing caches are valid for one TensorRT version on one kind of GPU only."""
        return f"timing.trt{self.tensorrt_version}.sm{self.compute_capability.replace('.', '')}.cache"


def fingerprint_path(engine: str | Path) -> Path:
    return Path(str(engine) + ".fingerprint.json")


def mismatches(built: EngineFingerprint, wanted: EngineFingerprint) -> list[str]:
    """Human-readable differences that make ``built`` unusable where ``wanted`` describes the need.

    The batch range is compatible when the engine's max batch is at least the wanted one.
    """
    out = []
    if built.tensorrt_version != wanted.tensorrt_version:
        out.append(f"TensorRT {built.tensorrt_version} built it, this device runs {wanted.tensorrt_version}")
    if built.compute_capability != wanted.compute_capability:
        out.append(
            f"built for GPU compute capability {built.compute_capability}, this GPU is {wanted.compute_capability}"
            + (f" ({wanted.device_name})" if wanted.device_name else "")
        )
    if built.precision != wanted.precision:
        out.append(f"precision is {built.precision}, {wanted.precision} was asked for")
    if built.onnx_sha256 != wanted.onnx_sha256:
        out.append("built from a different ONNX file than the manifest names (sha256 differs)")
    if built.max_batch < wanted.max_batch:
        out.append(f"max batch {built.max_batch} < the {wanted.max_batch} this server is configured for")
    if built.input_size != wanted.input_size:
        out.append(f"built for input {built.input_size or 'of the ONNX size'}, the manifest needs "
                   f"{wanted.input_size or 'the ONNX size'}")
    return out


def dynamic_input_size(input_shape: tuple[int, ...], width: int, height: int) -> str:
    """``EngineFingerprint.input_size`` for a model whose ONNX input is ``input_shape`` (NCHW,
    -1 for a dynamic axis), served at ``width`` x ``height``."""
    return f"{width}x{height}" if any(d < 0 for d in input_shape[2:4]) else ""


def check_engine(engine: str | Path, wanted: EngineFingerprint) -> None:
    """Raise ModelError unless ``engine`` exists with a fingerprint matching ``wanted``."""
    engine = Path(engine)
    fp_file = fingerprint_path(engine)
    if not engine.is_file():
        raise ModelError(f"TensorRT engine {engine} does not exist; build it on this device (build_engine_on_start)")
    if not fp_file.is_file():
        raise ModelError(f"{engine} has no {fp_file.name}; rebuild the engine on this device so it can be checked")
    built = EngineFingerprint.from_json(fp_file.read_text())
    problems = mismatches(built, wanted)
    if problems:
        raise ModelError(
            f"refusing TensorRT engine {engine.name}: " + "; ".join(problems)
            + ". Rebuild it on this device (perception serve --build-engine-on-start, or the build stage)."
        )


def write_fingerprint(engine: str | Path, fp: EngineFingerprint) -> Path:
    path = fingerprint_path(engine)
    path.write_text(fp.to_json() + "\n")
    return path


def device_fingerprint(precision: str, onnx_sha256: str, max_batch: int, device: int = 0,
                       input_size: str = "") -> EngineFingerprint:
    """This device's fingerprint (imports tensorrt and the CUDA runtime bindings lazily)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ModelError("TensorRT is not installed on this device (pip install 'perception[gpu]')") from exc
    from server.runtime.cuda import device_properties

    major, minor, name = device_properties(device)
    return EngineFingerprint(
        tensorrt_version=str(trt.__version__),
        compute_capability=f"{major}.{minor}",
        precision=precision,
        onnx_sha256=onnx_sha256,
        max_batch=max_batch,
        device_name=name,
        input_size=input_size,
    )
