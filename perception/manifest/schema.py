"""The manifest's types: what a build declares and a server reads, each checked on construction
(``perception.manifest.fields``) so that a manifest from outside the build fails to load, not
on every frame."""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from perception.errors import ManifestError
from perception.layouts import DECODERS
from perception.manifest.fields import check_range, check_relative, check_sha, check_types, to_enum, tuple_fields
from perception.options import MAX_DETECTIONS_LIMIT

SCHEMA_VERSION = 2

# Bounds on what a manifest may declare (max_detections: ``MAX_DETECTIONS_LIMIT``, as for a
# request). One 8192x8192 input is 768 MiB of float32 per frame of a batch.
MAX_INPUT_SIDE = 8192
# The decoders cut candidates to this many before NMS, whose numpy cost grows with the square
# of their number: 4,000 already cost 11 ms (docs/performance.md); the default is 1,000.
MAX_PRE_NMS_TOPK = 10_000
# A variant's max_batch: the server's own ceiling for its max_batch setting (server.config).
MAX_BATCH_LIMIT = 1024
# Over three times LVIS's 1,203, the largest common detection vocabulary.
MAX_CLASSES = 4096


class Precision(str, Enum):
    """Numeric precision of a variant's weights and activations."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"

    def __str__(self) -> str:
        return self.value


class VariantFormat(str, Enum):
    """What kind of file a variant is: an ONNX model, or a TensorRT engine built on a device."""

    ONNX = "onnx"
    TENSORRT = "tensorrt"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded BGR uint8 frame becomes the model's float input."""

    input_width: int
    input_height: int
    letterbox: bool = True
    pad_value: int = 114
    color_order: str = "RGB"  # channel order the model expects
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        check_types(self, "preprocess")
        check_range(self.input_width, 1, MAX_INPUT_SIDE, "preprocess: input_width")
        check_range(self.input_height, 1, MAX_INPUT_SIDE, "preprocess: input_height")
        if self.color_order not in ("RGB", "BGR"):
            raise ManifestError(f"color_order must be RGB or BGR, got {self.color_order!r}")
        if self.layout != "NCHW":
            raise ManifestError(f"only NCHW layout is supported, got {self.layout!r}")
        check_range(self.pad_value, 0, 255, "preprocess: pad_value")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ManifestError(f"preprocess: scale must be a finite number > 0, got {self.scale}")
        if not all(math.isfinite(m) for m in self.mean):
            raise ManifestError(f"preprocess: mean must be finite, got {self.mean}")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ManifestError(f"preprocess: std must be finite and > 0, got {self.std}")


@dataclass(frozen=True)
class Priors:
    """An SSD's prior boxes: a ``.npy`` file of (N, 4) float32 ``cx, cy, w, h`` normalised to
    0..1 of the model input, and the two variances its box offsets are scaled by."""

    file: str
    sha256: str
    variances: tuple[float, float] = (0.1, 0.2)

    def __post_init__(self) -> None:
        check_types(self, "priors")
        check_relative(self.file, "priors")
        check_sha(self.sha256, f"priors {self.file}")
        if not all(math.isfinite(v) and v > 0 for v in self.variances):
            raise ManifestError(f"priors: variances must be finite and > 0, got {self.variances}")


@dataclass(frozen=True)
class PostprocessSpec:
    """How to read the outputs, and the NMS defaults requests may override.

    output_layout: a registered layout name (``yolo_obj``, ...). outputs: role -> model output
    name, for models whose output names the layout cannot match on its own (empty: match).
    priors: an ``ssd`` model's prior boxes when its boxes are raw offsets. class_offset: what
    to subtract from a post-NMS model's class ids (1 when its class 0 is the background).
    """

    output_layout: str = "yolo_obj"
    score_threshold: float = 0.25
    iou_threshold: float = 0.5
    max_detections: int = 100
    pre_nms_topk: int = 1000
    class_agnostic: bool = False
    outputs: dict[str, str] = field(default_factory=dict)
    priors: Priors | None = None
    class_offset: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.priors, dict):
            object.__setattr__(self, "priors", Priors(**tuple_fields(self.priors, ("variances",))))
        check_types(self, "postprocess")
        if self.priors is not None and self.output_layout != "ssd":
            raise ManifestError(f"priors only apply to the ssd layout, not {self.output_layout}")
        if not 0 <= self.class_offset <= 1:
            raise ManifestError(f"class_offset must be 0 or 1, got {self.class_offset}")
        if self.output_layout not in DECODERS:
            raise ManifestError(f"unknown output_layout {self.output_layout!r}; known: {sorted(DECODERS)}")
        if not 0.0 <= self.score_threshold <= 1.0 or not 0.0 < self.iou_threshold <= 1.0:
            raise ManifestError("score_threshold must be in [0, 1] and iou_threshold in (0, 1]")
        check_range(self.max_detections, 1, MAX_DETECTIONS_LIMIT, "postprocess: max_detections")
        check_range(self.pre_nms_topk, 1, MAX_PRE_NMS_TOPK, "postprocess: pre_nms_topk")
        roles = DECODERS[self.output_layout].roles
        unknown = sorted(set(self.outputs) - set(roles))
        if unknown:
            raise ManifestError(f"outputs maps roles {unknown} that layout {self.output_layout} does not have {roles}")


@dataclass(frozen=True)
class SourceFile:
    """An exact file, by name and content: what a TensorRT engine was built from."""

    file: str
    sha256: str

    def __post_init__(self) -> None:
        check_types(self, "source file")
        check_relative(self.file, "source file")
        check_sha(self.sha256, f"source file {self.file}")


@dataclass(frozen=True)
class QdqTwin:
    """The signed, zero-point-0 Q/DQ model TensorRT builds an INT8 engine from (onnxruntime's
    U8 model is not accepted by TensorRT's explicit quantization), scored at build time through
    onnxruntime against its INT8 variant's accuracy gate."""

    file: str
    sha256: str
    calibrator: str
    activations: str = "int8, symmetric (zero point 0)"
    metrics: dict[str, float] = field(default_factory=dict)
    parity: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=lambda: {"passed": True, "reason": "not gated"})

    def __post_init__(self) -> None:
        check_types(self, "TensorRT Q/DQ twin")
        check_relative(self.file, "TensorRT Q/DQ twin")
        check_sha(self.sha256, f"TensorRT Q/DQ twin {self.file}")

    @property
    def passed(self) -> bool:
        return bool(self.gate.get("passed", False))


@dataclass(frozen=True)
class EngineRecord:
    """What a shipped TensorRT engine was built for (its device fingerprint)."""

    tensorrt_version: str
    compute_capability: str
    precision: str
    onnx_sha256: str
    max_batch: int
    device_name: str = ""
    input_size: str = ""  # WxH its profile was built for when the ONNX's size is dynamic, else ""

    def __post_init__(self) -> None:
        check_types(self, "engine record")


@dataclass(frozen=True)
class Calibration:
    """How an INT8 variant was calibrated: the calibrator, the calibration set's hash, and the
    nodes left in FP32."""

    calibrator: str
    set_sha256: str
    fp32_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_types(self, "calibration")


@dataclass(frozen=True)
class Weights:
    """The checkpoint a family of variants was exported from (and its pruning history)."""

    checkpoint: str
    sha256: str
    pruning: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_types(self, "weights")


@dataclass(frozen=True)
class Variant:
    """One deployable model file, where it came from, and the evidence gathered for it.

    family: the weights this variant carries ("base", "pruned", ...): variants of one family
    differ only in precision or runtime. parent: the variant it was derived from ("" for a
    family's FP32 export). For a TensorRT engine: ``source`` is the exact ONNX file it was
    built from and ``engine`` its device fingerprint.
    """

    name: str
    file: str
    precision: Precision
    sha256: str
    format: VariantFormat = VariantFormat.ONNX
    family: str = "base"
    parent: str = ""
    input_shape: tuple[int, ...] = ()  # e.g. (-1, 3, 384, 640); -1 = dynamic batch
    max_batch: int = 8
    macs: int = 0
    params: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    parity: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=lambda: {"passed": True, "reason": "not gated"})
    weights: Weights | None = None
    calibration: Calibration | None = None
    tensorrt_qdq: QdqTwin | None = None
    source: SourceFile | None = None
    engine: EngineRecord | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", to_enum(Precision, self.precision, f"variant {self.name!r}: precision"))
        object.__setattr__(self, "format", to_enum(VariantFormat, self.format, f"variant {self.name!r}: format"))
        check_types(self, f"variant {self.name!r}")
        check_relative(self.file, f"variant {self.name!r}")
        check_sha(self.sha256, f"variant {self.name!r}")
        if not self.name or not self.family:
            raise ManifestError(f"variant {self.name!r}: name and family must be non-empty")
        check_range(self.max_batch, 1, MAX_BATCH_LIMIT, f"variant {self.name!r}: max_batch")
        if self.format is VariantFormat.TENSORRT and (self.source is None or self.engine is None):
            raise ManifestError(f"TensorRT variant {self.name!r} must declare its source ONNX file and engine record")
        if self.tensorrt_qdq is not None and self.precision is not Precision.INT8:
            raise ManifestError(f"variant {self.name!r}: only an INT8 variant has a TensorRT Q/DQ twin")

    @property
    def passed(self) -> bool:
        """Whether the variant passed its build-time gate."""
        return bool(self.gate.get("passed", False))

    def files(self) -> dict[str, str]:
        """Every file this variant names -> its sha256 (the model, and its Q/DQ twin)."""
        out = {self.file: self.sha256}
        if self.tensorrt_qdq is not None:
            out[self.tensorrt_qdq.file] = self.tensorrt_qdq.sha256
        return out


@dataclass(frozen=True)
class Verification:
    """Frames shipped with the artifact and what each variant detected on them at build time
    (``[x1, y1, x2, y2, score, class]`` per detection, source pixels, the deployed threshold): a
    server about to swap a model in checks that it still detects that, on this device."""

    frames: tuple[SourceFile, ...]
    expected: dict[str, list[list[list[float]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_types(self, "verification")
        for name, per_frame in self.expected.items():
            if len(per_frame) != len(self.frames):
                raise ManifestError(
                    f"verification: variant {name!r} has {len(per_frame)} frames of detections "
                    f"for {len(self.frames)} frames"
                )


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    classes: tuple[str, ...]
    preprocess: PreprocessSpec
    postprocess: PostprocessSpec
    variants: tuple[Variant, ...]
    default_variant: str
    schema_version: int = SCHEMA_VERSION
    architecture: str = ""  # the detector family, e.g. "yolo", "ssd", "rcnn", "imported"
    verification: Verification | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # Directory the manifest was loaded from; not serialised.
    root: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_types(self, "manifest")
        if self.schema_version != SCHEMA_VERSION:
            raise ManifestError(f"schema_version {self.schema_version} is not {SCHEMA_VERSION}")
        check_range(len(self.classes), 1, MAX_CLASSES, "manifest: the number of classes")
        if not all(self.classes) or len(set(self.classes)) != len(self.classes):
            raise ManifestError(f"manifest: class names must be non-empty and unique, got {reprlib.repr(self.classes)}")
        if not self.variants:
            raise ManifestError("manifest lists no variants")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ManifestError(f"duplicate variant names: {names}")
        if self.default_variant not in names:
            raise ManifestError(f"default_variant {self.default_variant!r} is not one of {names}")
        for v in self.variants:
            if v.parent and v.parent not in names:
                raise ManifestError(f"variant {v.name!r}: parent {v.parent!r} is not one of {names}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def variant(self, name: str | None = None) -> Variant:
        """The named variant, or the default one."""
        wanted = name or self.default_variant
        for v in self.variants:
            if v.name == wanted:
                return v
        raise ManifestError(f"no variant {wanted!r}; available: {[v.name for v in self.variants]}")

    def sibling(self, of: Variant, precision: Precision, fmt: VariantFormat = VariantFormat.ONNX) -> Variant | None:
        """The variant of ``of``'s family at ``precision`` in format ``fmt``, if the build made one."""
        for v in self.variants:
            if v.family == of.family and v.precision is precision and v.format is fmt:
                return v
        return None

    def onnx_of(self, variant: Variant) -> Variant:
        """The ONNX variant behind ``variant``: itself, or the parent a TensorRT engine was built from."""
        v = variant
        seen = set()
        while v.format is not VariantFormat.ONNX:
            if not v.parent or v.name in seen:
                raise ManifestError(f"variant {variant.name!r} names no ONNX parent")
            seen.add(v.name)
            v = self.variant(v.parent)
        return v

    def path_of(self, variant: Variant | str) -> Path:
        """Absolute path of a variant's file (or of a file name the manifest lists)."""
        if self.root is None:
            raise ManifestError("manifest was not loaded from a directory")
        return self.root / (variant.file if isinstance(variant, Variant) else variant)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("root", None)
        return json.loads(json.dumps(d, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, Enum):
        return o.value
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
