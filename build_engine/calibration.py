"""INT8 calibration data: real dataset images through the one frame pipeline.

``ImageCalibrationReader`` implements onnxruntime's ``CalibrationDataReader`` interface; each
image file's encoded bytes go through ``perception.pipeline.FramePipeline`` exactly as the
server receives them (including its reduced-scale JPEG decode of large frames), so the
activation ranges are fitted to what the deployed model will actually see.

The calibration set is identified by ``calibration_set_hash``: sha256 over the sorted
``name sha256`` lines of its files, recorded in the manifest's provenance.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from perception.errors import DataError, InvalidInputError
from perception.manifest import PostprocessSpec, PreprocessSpec, sha256_file
from perception.pipeline import FramePipeline, file_frame

log = logging.getLogger(__name__)

# name -> onnxruntime.quantization.CalibrationMethod attribute name.
CALIBRATORS: dict[str, str] = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
# What the server decodes (JPEG and PNG): calibrating on anything else would fit ranges to
# pixels the model is never served.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def calibration_method(name: str) -> object:
    """The onnxruntime CalibrationMethod for ``minmax`` / ``percentile`` / ``entropy``."""
    from onnxruntime.quantization import CalibrationMethod

    if name not in CALIBRATORS:
        raise DataError(f"unknown calibrator {name!r}; choose one of {sorted(CALIBRATORS)}")
    return getattr(CalibrationMethod, CALIBRATORS[name])


def list_images(source: Path, limit: int | None = None) -> list[Path]:
    """Image files of a directory (recursively, sorted), or of a dataset dir's ``images/``.

    Raises DataError when there are none: quantizing without calibration data is meaningless.
    """
    source = Path(source)
    root = source / "images" if (source / "images").is_dir() else source
    if not root.is_dir():
        raise DataError(f"{source}: calibration source is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        raise DataError(f"{source}: calibration set is empty (no {'/'.join(IMAGE_SUFFIXES)} images)")
    return paths


def calibration_set_hash(paths: Sequence[Path], root: Path | None = None) -> str:
    """sha256 identifying a set of images by name and content, independent of order."""
    lines = []
    for p in paths:
        name = str(p.relative_to(root)) if root is not None else p.name
        lines.append(f"{name} {sha256_file(p)}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def iter_batches(
    paths: Sequence[Path], spec: PreprocessSpec, batch_size: int = 1
) -> Iterator[NDArray[np.float32]]:
    """(B, 3, H, W) float32 model inputs for ``paths``, in order, as the server builds them."""
    # Only the pre-processing half runs here; the output layout plays no part.
    pipeline = FramePipeline(spec, PostprocessSpec(), ("object",))
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        try:
            yield pipeline.model_inputs(file_frame(p) for p in chunk)
        except InvalidInputError as exc:
            raise DataError(f"{', '.join(str(p) for p in chunk)}: the server would refuse this image: {exc}") from exc


class ImageCalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over image files (duck-typed: get_next / rewind).

    input_name: the model's input tensor name. Each call of ``get_next`` returns one batch.
    """

    def __init__(
        self, paths: Sequence[Path], spec: PreprocessSpec, input_name: str = "images", batch_size: int = 1
    ) -> None:
        if not paths:
            raise DataError("calibration set is empty")
        self.paths = list(paths)
        self.spec = spec
        self.input_name = input_name
        self.batch_size = batch_size
        self._it: Iterator[NDArray[np.float32]] | None = None

    def get_next(self) -> dict[str, NDArray[np.float32]] | None:
        if self._it is None:
            self._it = iter_batches(self.paths, self.spec, self.batch_size)
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = None

    def __len__(self) -> int:
        return (len(self.paths) + self.batch_size - 1) // self.batch_size


def as_ort_reader(reader: ImageCalibrationReader) -> object:
    """Wrap in a real ``CalibrationDataReader`` subclass (onnxruntime checks the type)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, NDArray[np.float32]] | None:
            return reader.get_next()

        def rewind(self) -> None:
            reader.rewind()

    return _Reader()


# --- What calibration chose, and how well it fits: the report's sensitivity analysis ---


@dataclass(frozen=True)
class ChosenRange:
    """The clipping range a Q/DQ model uses for one tensor.

    Activations: asymmetric U8, ``lo = -zp * scale``, ``hi = (255 - zp) * scale``.
    Weights: symmetric per-channel INT8, ``scales`` per output channel (range +-127 * scale).
    """

    tensor: str
    kind: str  # "activation" or "weight"
    lo: float
    hi: float
    scales: tuple[float, ...] = ()


def qdq_ranges(int8_path: Path) -> dict[str, ChosenRange]:
    """tensor name (as in the FP32 graph) -> the range its Q/DQ pair clips to."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(int8_path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    out: dict[str, ChosenRange] = {}
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            s = float(np.asarray(inits[n.input[1]]).reshape(-1)[0])
            zp = float(np.asarray(inits[n.input[2]]).reshape(-1)[0]) if len(n.input) > 2 else 0.0
            info = np.iinfo(inits[n.input[2]].dtype) if len(n.input) > 2 else np.iinfo(np.uint8)
            out[n.input[0]] = ChosenRange(n.input[0], "activation", (info.min - zp) * s, (info.max - zp) * s)
        elif n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized") and ".weight" in n.input[0]:
            scales = np.asarray(inits[n.input[1]], np.float64).reshape(-1)
            name = n.input[0][: -len("_quantized")]
            hi = float(scales.max() * 127)
            out[name] = ChosenRange(name, "weight", -hi, hi, tuple(float(x) for x in scales))
    return out


def fake_quant(x: NDArray[np.floating], lo: float, hi: float, levels: int = 256) -> NDArray[np.float64]:
    """Quantize-dequantize ``x`` onto ``levels`` steps spanning [lo, hi] (values outside clip)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero must be exactly representable
    scale = max(hi - lo, 1e-12) / (levels - 1)
    zp = np.round(-lo / scale)
    q = np.clip(np.round(np.asarray(x, np.float64) / scale) + zp, 0, levels - 1)
    return (q - zp) * scale


def sqnr_db(x: NDArray[np.floating], xq: NDArray[np.floating]) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; +inf for exact)."""
    x = np.asarray(x, np.float64)
    noise = float(np.sum((x - np.asarray(xq, np.float64)) ** 2))
    signal = float(np.sum(x**2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(max(signal, 1e-30) / noise))


def collect_tensors(
    fp32_path: Path,
    names: Sequence[str],
    batches: Sequence[NDArray[np.float32]],
    max_values: int = 200_000,
    seed: int = 0,
) -> dict[str, NDArray[np.float32]]:
    """Values of intermediate tensors of an FP32 ONNX model on ``batches`` (subsampled, flat)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    proto = onnx.load(str(fp32_path))
    produced = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    wanted = [n for n in names if n in produced]
    existing = {o.name for o in proto.graph.output}
    proto.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in wanted if n not in existing
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    chunks: dict[str, list[NDArray[np.float32]]] = {n: [] for n in wanted}
    for batch in batches:
        for n, v in zip(wanted, sess.run(wanted, {input_name: batch}), strict=True):
            chunks[n].append(np.asarray(v, np.float32).reshape(-1))
    rng = np.random.default_rng(seed)
    out = {}
    for n, parts in chunks.items():
        flat = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        out[n] = flat if flat.size <= max_values else rng.choice(flat, max_values, replace=False)
    return out
