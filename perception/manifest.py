"""The manifest: the only handshake between the build stage and the server.

``manifest.json`` sits beside the engine files it names. It says how to pre-process a frame,
how to read the model's outputs (``postprocess.output_layout``, a name from
``perception.layouts.DECODERS``, documented in ``docs/output_layouts.md``), which variants
exist (fp32 / fp16 / int8 / pruned / TensorRT engines ...), what each costs (MACs, params,
latency) and scores (KPI, parity, gate), and where each came from, as declared fields:
its weights family, parent variant, the exact ONNX file an engine was built from, the
TensorRT Q/DQ twin of an INT8 model, an engine's device fingerprint, its calibration. Nothing
is inferred from variant names.

Schema versions: 2 is current. A version-1 manifest (``perception build`` before typed
provenance) loads through ``migrate_v1``, which is the one place that reads the old
free-form ``extra`` keys and name conventions; anything older or newer is refused.

Every field is checked on construction against its declared type, the way JSON carries it
(an int is not a float or a bool, a list of names is not a string), and the values the server
sizes buffers and loops by against the bounds below: a manifest may come from outside the
build, and a wrong value would otherwise load and fail on every frame, or serve nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import reprlib
import tempfile
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

from perception.errors import ManifestError
from perception.layouts import DECODERS
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


def _enum(cls: type[Enum], value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ManifestError(f"{what} must be one of {[m.value for m in cls]}, got {value!r}") from None


def _conforms(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the declared type ``tp``, strictly: a bool is not an int, a float
    is not an int (an int is a float), a list is not a tuple (the loader turns the JSON lists
    of tuple fields into tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args, strict=True))
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(k, args[0]) and _conforms(v, args[1])
                                               for k, v in value.items())
    return isinstance(value, tp)  # str, bool, Path, an enum, a nested spec


@cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "").replace(f"{__name__}.", "")


def _check_types(obj: Any, what: str) -> None:
    """Every field of ``obj`` (a manifest dataclass) holds its declared type."""
    hints = _field_types(obj.__class__)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _conforms(value, hints[f.name]):
            raise ManifestError(f"{what}: {f.name} must be {_type_name(hints[f.name])}, got {reprlib.repr(value)}")


def _check_range(value: int, lo: int, hi: int, what: str) -> None:
    if not lo <= value <= hi:
        raise ManifestError(f"{what} must be in {lo}..{hi}, got {value}")


def check_relative(path: str, what: str) -> None:
    """A path the manifest names must stay inside the artifact directory."""
    if not path or os.path.isabs(path) or ".." in Path(path).parts or "\0" in path:
        raise ManifestError(f"{what}: file must be a relative path inside the artifact dir, got {path!r}")


def _check_sha(sha: str, what: str) -> None:
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ManifestError(f"{what}: sha256 must be 64 lowercase hex digits, got {sha!r}")


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
        _check_types(self, "preprocess")
        _check_range(self.input_width, 1, MAX_INPUT_SIDE, "preprocess: input_width")
        _check_range(self.input_height, 1, MAX_INPUT_SIDE, "preprocess: input_height")
        if self.color_order not in ("RGB", "BGR"):
            raise ManifestError(f"color_order must be RGB or BGR, got {self.color_order!r}")
        if self.layout != "NCHW":
            raise ManifestError(f"only NCHW layout is supported, got {self.layout!r}")
        _check_range(self.pad_value, 0, 255, "preprocess: pad_value")
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
        _check_types(self, "priors")
        check_relative(self.file, "priors")
        _check_sha(self.sha256, f"priors {self.file}")
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
            object.__setattr__(self, "priors", Priors(**_tuple_fields(self.priors, ("variances",))))
        _check_types(self, "postprocess")
        if self.priors is not None and self.output_layout != "ssd":
            raise ManifestError(f"priors only apply to the ssd layout, not {self.output_layout}")
        if not 0 <= self.class_offset <= 1:
            raise ManifestError(f"class_offset must be 0 or 1, got {self.class_offset}")
        if self.output_layout not in DECODERS:
            raise ManifestError(f"unknown output_layout {self.output_layout!r}; known: {sorted(DECODERS)}")
        if not 0.0 <= self.score_threshold <= 1.0 or not 0.0 < self.iou_threshold <= 1.0:
            raise ManifestError("score_threshold must be in [0, 1] and iou_threshold in (0, 1]")
        _check_range(self.max_detections, 1, MAX_DETECTIONS_LIMIT, "postprocess: max_detections")
        _check_range(self.pre_nms_topk, 1, MAX_PRE_NMS_TOPK, "postprocess: pre_nms_topk")
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
        _check_types(self, "source file")
        check_relative(self.file, "source file")
        _check_sha(self.sha256, f"source file {self.file}")


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
        _check_types(self, "TensorRT Q/DQ twin")
        check_relative(self.file, "TensorRT Q/DQ twin")
        _check_sha(self.sha256, f"TensorRT Q/DQ twin {self.file}")

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
        _check_types(self, "engine record")


@dataclass(frozen=True)
class Calibration:
    """How an INT8 variant was calibrated: the calibrator, the calibration set's hash, and the
    nodes left in FP32."""

    calibrator: str
    set_sha256: str
    fp32_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_types(self, "calibration")


@dataclass(frozen=True)
class Weights:
    """The checkpoint a family of variants was exported from (and its pruning history)."""

    checkpoint: str
    sha256: str
    pruning: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(self, "weights")


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
        object.__setattr__(self, "precision", _enum(Precision, self.precision, f"variant {self.name!r}: precision"))
        object.__setattr__(self, "format", _enum(VariantFormat, self.format, f"variant {self.name!r}: format"))
        _check_types(self, f"variant {self.name!r}")
        check_relative(self.file, f"variant {self.name!r}")
        _check_sha(self.sha256, f"variant {self.name!r}")
        if not self.name or not self.family:
            raise ManifestError(f"variant {self.name!r}: name and family must be non-empty")
        _check_range(self.max_batch, 1, MAX_BATCH_LIMIT, f"variant {self.name!r}: max_batch")
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
        _check_types(self, "verification")
        for name, per_frame in self.expected.items():
            if len(per_frame) != len(self.frames):
                raise ManifestError(f"verification: variant {name!r} has {len(per_frame)} frames of detections "
                                    f"for {len(self.frames)} frames")


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
        _check_types(self, "manifest")
        if self.schema_version != SCHEMA_VERSION:
            raise ManifestError(f"schema_version {self.schema_version} is not {SCHEMA_VERSION}")
        _check_range(len(self.classes), 1, MAX_CLASSES, "manifest: the number of classes")
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


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tuple_fields(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: (tuple(v) if k in keys and isinstance(v, list) else v) for k, v in d.items()}


def _sub(cls: type, value: Any, what: str, tuples: tuple[str, ...] = ()) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ManifestError(f"{what} must be an object")
    return cls(**_tuple_fields(value, tuples))


def _variant_from_dict(v: Any) -> Variant:
    if not isinstance(v, dict):
        raise ManifestError(f"a variant must be an object, got {reprlib.repr(v)}")
    name = v.get("name", "?")
    d = _tuple_fields(v, ("input_shape",))
    d["weights"] = _sub(Weights, d.get("weights"), f"variant {name!r}: weights")
    d["calibration"] = _sub(Calibration, d.get("calibration"), f"variant {name!r}: calibration", ("fp32_nodes",))
    d["tensorrt_qdq"] = _sub(QdqTwin, d.get("tensorrt_qdq"), f"variant {name!r}: tensorrt_qdq")
    d["source"] = _sub(SourceFile, d.get("source"), f"variant {name!r}: source")
    d["engine"] = _sub(EngineRecord, d.get("engine"), f"variant {name!r}: engine")
    return Variant(**d)


def manifest_from_dict(data: dict[str, Any], root: Path | None = None) -> Manifest:
    """Build and validate a Manifest from parsed JSON (migrating schema 1); unknown keys are an error."""
    try:
        version = data.get("schema_version", 1)
        if version == 1:
            data = migrate_v1(data)
        elif version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version {version} is not supported (this release reads 1 and {SCHEMA_VERSION})"
            )
        pre = _sub(PreprocessSpec, data["preprocess"], "preprocess", ("mean", "std"))
        post = _sub(PostprocessSpec, data.get("postprocess", {}), "postprocess")
        if not isinstance(data["variants"], list):
            raise ManifestError("variants must be a list of objects")
        variants = tuple(_variant_from_dict(v) for v in data["variants"])
        data = _tuple_fields(data, ("classes",))
        rest = {k: v for k, v in data.items() if k not in ("preprocess", "postprocess", "variants", "classes")}
        if isinstance(rest.get("verification"), dict):
            ver = rest["verification"]
            rest["verification"] = Verification(
                tuple(_sub(SourceFile, f, "verification frame") for f in ver.get("frames", [])),
                dict(ver.get("expected", {})))
        return Manifest(
            classes=data["classes"], preprocess=pre, postprocess=post, variants=variants, root=root, **rest
        )
    except ManifestError:
        raise
    except KeyError as exc:
        raise ManifestError(f"manifest is missing the key {exc}") from exc
    except (TypeError, AttributeError) as exc:
        raise ManifestError(f"manifest has a malformed or unknown field: {exc}") from exc


_V1_LAYOUTS = {"xyxy_obj_cls": "yolo_obj"}


def migrate_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 manifest as schema 2: the one place that reads v1's free-form ``extra`` keys
    and its variant-name conventions (``trt_`` prefix, ``pruned_`` family, ``_fp32`` parents).

    A v1 variant without a sha256 cannot be verified and is refused.
    """
    out = json.loads(json.dumps(data))
    out["schema_version"] = SCHEMA_VERSION
    post = out.setdefault("postprocess", {})
    layout = post.get("output_layout", "xyxy_obj_cls")
    post["output_layout"] = _V1_LAYOUTS.get(layout, layout)
    names = {v.get("name") for v in out.get("variants", [])}
    migrated = []
    for v in out.get("variants", []):
        extra = v.pop("extra", {}) or {}
        name = str(v.get("name", ""))
        if not v.get("sha256"):
            raise ManifestError(f"schema-1 variant {name!r} has no sha256 and cannot be verified; rebuild the artifact "
                                "with `perception build`")
        base = name.removeprefix("trt_")
        family = base.rsplit("_", 1)[0] if "_" in base else "base"
        v["family"] = family
        fp32 = f"{family}_fp32" if family != "base" else "fp32"
        if v.get("format") == "tensorrt":
            v["parent"] = str(extra.get("onnx_variant") or base)
            fp = extra.get("fingerprint") or {}
            v["engine"] = {k: fp[k] for k in ("tensorrt_version", "compute_capability", "precision", "onnx_sha256",
                                              "max_batch", "device_name") if k in fp}
            v["source"] = {"file": "", "sha256": fp.get("onnx_sha256", "")}
            v["source"]["file"] = _v1_engine_source_file(out, v["parent"], v.get("precision", ""))
        elif name != fp32 and fp32 in names:
            v["parent"] = fp32
        if "checkpoint" in extra:
            v["weights"] = {"checkpoint": extra["checkpoint"], "sha256": extra.get("checkpoint_sha256", ""),
                            "pruning": extra.get("pruning", {})}
        if "calibrator" in extra or "calibration_sha256" in extra:
            v["calibration"] = {"calibrator": extra.get("calibrator", ""),
                                "set_sha256": extra.get("calibration_sha256", ""),
                                "fp32_nodes": list(extra.get("fp32_nodes", []))}
        if isinstance(extra.get("tensorrt_qdq"), dict):
            q = extra["tensorrt_qdq"]
            v["tensorrt_qdq"] = {k: q[k] for k in ("file", "sha256", "calibrator", "activations", "metrics", "parity",
                                                    "gate") if k in q}
        migrated.append(v)
    out["variants"] = migrated
    return out


def _v1_engine_source_file(data: dict[str, Any], parent: str, precision: str) -> str:
    for v in data.get("variants", []):
        if v.get("name") == parent:
            q = (v.get("extra") or {}).get("tensorrt_qdq") if isinstance(v.get("extra"), dict) else None
            if precision == "int8" and isinstance(q, dict):
                return str(q.get("file", ""))
            if isinstance(v.get("tensorrt_qdq"), dict) and precision == "int8":
                return str(v["tensorrt_qdq"].get("file", ""))
            return str(v.get("file", ""))
    return ""


def check_file(root: Path, name: str, sha256: str, what: str) -> Path:
    """``root/name`` as a regular file inside ``root`` (after resolving links) with this sha256.

    The file is hashed here and read again by whoever opens the path returned: a loader that
    must run exactly the checked bytes hashes the bytes it loads instead (``read_checked``)."""
    check_relative(name, what)
    path = root / name
    try:
        resolved = path.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        raise ManifestError(f"{what} names {name}, which does not exist") from None
    except OSError as exc:  # a name the OS refuses, e.g. too long (check_relative refused NUL bytes)
        raise ManifestError(f"{what} names {name!r}, which cannot be resolved: {exc}") from None
    if not resolved.is_relative_to(root.resolve()):
        raise ManifestError(f"{what} names {name}, which resolves outside the artifact directory")
    if not resolved.is_file():
        raise ManifestError(f"{what} names {name}, which is not a regular file")
    try:
        digest = sha256_file(resolved)
    except OSError as exc:
        raise ManifestError(f"{what}: cannot read {name}: {exc}") from exc
    if digest != sha256:
        raise ManifestError(_mismatch(what, name))
    return resolved


def read_checked(path: Path, sha256: str, what: str) -> bytes:
    """The bytes of ``path``, read once, if they have this sha256.

    Loading these bytes loads what was checked: opening the path again after a check would load
    whatever the file holds by then (an artifact directory changed in between). Where the file
    lies was checked when its manifest loaded (``check_file``); its content is bound here."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{what}: cannot read {path.name}: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ManifestError(_mismatch(what, path.name))
    return data


def _mismatch(what: str, name: str) -> str:
    return f"{what}: {name} does not match its sha256 in the manifest (corrupt or replaced file)"


def load_manifest(path: str | os.PathLike[str], verify_checksums: bool = True, *,
                  content: bytes | None = None) -> Manifest:
    """Load ``manifest.json`` (or a directory holding one) and check every file it names.

    content: the manifest's bytes, when the caller has read them already: the manifest is parsed
    from exactly those (``path`` still places the artifact directory). A server that verified
    the manifest's signature passes the bytes it verified (``verify_manifest`` returns them):
    reading the file a second time would parse whatever it holds by then, signed or not.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    try:
        data = json.loads(p.read_bytes() if content is None else content)
    except FileNotFoundError as exc:
        raise ManifestError(f"{p}: no such manifest") from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{p}: cannot read manifest: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{p}: manifest must be a JSON object")
    try:
        manifest = manifest_from_dict(data, root=p.parent.resolve())
    except ManifestError as exc:
        raise ManifestError(f"{p}: {exc}") from exc
    if verify_checksums:
        assert manifest.root is not None
        if manifest.verification is not None:
            for f in manifest.verification.frames:
                try:
                    check_file(manifest.root, f.file, f.sha256, "verification frame")
                except ManifestError as exc:
                    raise ManifestError(f"{p}: {exc}") from exc
        priors = manifest.postprocess.priors
        if priors is not None:
            try:
                check_file(manifest.root, priors.file, priors.sha256, "priors")
            except ManifestError as exc:
                raise ManifestError(f"{p}: {exc}") from exc
        for v in manifest.variants:
            for name, sha in v.files().items():
                try:
                    check_file(manifest.root, name, sha, f"variant {v.name!r}")
                except ManifestError as exc:
                    raise ManifestError(f"{p}: {exc}") from exc
    return manifest


def save_manifest(manifest: Manifest, directory: str | os.PathLike[str]) -> Path:
    """Write ``directory/manifest.json`` atomically: a crash never leaves half a manifest."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    target = d / "manifest.json"
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(manifest.to_dict(), f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the server may run as another user
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
