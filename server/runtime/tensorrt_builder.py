"""Build a TensorRT 10 engine from the manifest's ONNX file, on the device that will run it.

Every network is strongly typed: the precision comes from the ONNX graph itself, never from
builder flags (TensorRT 10.12 deprecated the FP16 / INT8 flags and implicit-quantization
calibrators; 11.x removed them). So the ONNX file decides (``factory.tensorrt_source``):
- FP32: the FP32 model.
- FP16: the build stage's FP16 model (FP16 weights and activations, FP32 IO and box decode).
- INT8: the build stage's TensorRT Q/DQ model (explicit quantization: signed INT8, zero
  points 0, per-channel weights); the layers it leaves unquantized run in FP32.
- An optimisation profile for batch 1..max_batch (opt = max_batch) at the model's input size,
  or the manifest's where the ONNX input leaves height and width dynamic (a model imported
  with ``--input-size``), and a timing cache so a rebuild on the same device takes seconds
  instead of minutes.
The engine is written with its fingerprint (``fingerprint.py``). TensorRT is imported lazily.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from perception.errors import ModelError
from server.runtime.fingerprint import EngineFingerprint, write_fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    precision: str  # fp32 | fp16 | int8: what the ONNX model holds (recorded in the fingerprint)
    max_batch: int
    # The manifest's input size: the profile's, where the ONNX input's height / width are dynamic.
    input_height: int | None = None
    input_width: int | None = None
    workspace_bytes: int = 1 << 30
    timing_cache: str = ""  # file; created if missing, updated after the build

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16", "int8"):
            raise ModelError(f"unknown TensorRT precision {self.precision!r}")
        if self.max_batch < 1:
            raise ModelError(f"max_batch must be >= 1, got {self.max_batch}")
        for side in (self.input_height, self.input_width):
            if side is not None and side < 1:
                raise ModelError(f"the input height and width must be >= 1, got {side}")


def profile_shapes(dims: Sequence[int], opts: BuildOptions, what: str) -> tuple[list[int], list[int]]:
    """The optimisation profile's smallest and largest input shapes for an ONNX input of shape
    ``dims`` (-1: dynamic): batch 1 and ``max_batch``, then the model's channels, height and
    width, or where the model leaves them dynamic, 3 channels and the manifest's height and
    width (``opts``): TensorRT builds no profile with a dynamic dimension left in it. A fixed
    side the manifest contradicts is refused. ``what`` names the input in errors."""
    if len(dims) != 4:
        raise ModelError(f"{what} has shape {list(dims)}, expected (batch, 3, H, W)")
    sides = [_side(dims[2], opts.input_height, "height", what), _side(dims[3], opts.input_width, "width", what)]
    channels = dims[1] if dims[1] > 0 else 3  # the pre-processing always feeds 3 (RGB or BGR)
    return [1, channels, *sides], [opts.max_batch, channels, *sides]


def _side(model: int, manifest: int | None, name: str, what: str) -> int:
    if model > 0:
        if manifest is not None and manifest != model:
            raise ModelError(f"{what} has {name} {model}, but the manifest's input {name} is {manifest}")
        return model
    if manifest is None:
        raise ModelError(f"{what} has a dynamic {name}: the engine build needs the manifest's input {name}")
    return manifest


def build_engine(onnx_path: str | Path, engine_path: str | Path, opts: BuildOptions, fp: EngineFingerprint,
                 onnx_bytes: bytes | None = None) -> Path:
    """Build ``engine_path`` (+ its fingerprint) from ``onnx_path``. Raises ModelError.

    ``onnx_bytes``: the model's bytes as they were checked against its manifest; parsed instead
    of the file (``onnx_path`` still locates external weight data, if the model has any)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ModelError("TensorRT is not installed on this device (pip install 'perception[gpu]')") from exc
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Required for this on 10.x, the only mode on 11.x (where the flag is accepted and ignored).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    parsed = (parser.parse_from_file(str(onnx_path)) if onnx_bytes is None  # (resolves external weight data too)
              else parser.parse(onnx_bytes, str(onnx_path)))
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_bytes)
    if network.num_inputs != 1:
        raise ModelError(f"{onnx_path.name} has {network.num_inputs} inputs; the detector takes one image batch")
    inp = network.get_input(0)
    dims = inp.shape
    lo, hi = profile_shapes([dims[i] for i in range(len(dims))], opts, f"{onnx_path.name}: input {inp.name!r}")
    profile = builder.create_optimization_profile()
    # min, opt, max: opt = max, the batch the server fills
    profile.set_shape(inp.name, trt.Dims(lo), trt.Dims(hi), trt.Dims(hi))
    config.add_optimization_profile(profile)
    cache_file = Path(opts.timing_cache) if opts.timing_cache else None
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not fit this TensorRT / GPU; starting a fresh one", cache_file)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    log.info("building TensorRT %s engine from %s (input %s..%s)", opts.precision, onnx_path.name, lo, hi)
    # None when the build fails (the reason is in TensorRT's log), though the stubs promise memory.
    serialized: trt.IHostMemory | None = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT failed to build an engine from {onnx_path.name}; see the log above")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(engine_path, bytes(serialized))
    write_fingerprint(engine_path, fp)
    if cache_file is not None:
        _atomic_write(cache_file, bytes(config.get_timing_cache().serialize()))
    return engine_path


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
