"""The manifest: the only handshake between the build stage and the server.

``manifest.json`` sits beside the engine files it names. It says how to pre-process a frame,
how to read the model's output, which variants exist (fp32 / fp16 / int8 / pruned ...),
what each costs (MACs, params, latency) and scores (KPI, parity, gate), and where it came from.

Output layout ``"xyxy_obj_cls"`` (the only one the server decodes today):
one output tensor of shape (batch, N, 5 + num_classes): x1 y1 x2 y2 in model-input pixels,
then objectness and per-class probabilities, both already passed through a sigmoid.
A detection's score is objectness x class probability.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perception.errors import ManifestError

SCHEMA_VERSION = 1
OUTPUT_LAYOUTS = ("xyxy_obj_cls",)
PRECISIONS = ("fp32", "fp16", "int8")


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
        if self.input_width <= 0 or self.input_height <= 0:
            raise ManifestError(f"input size must be positive, got {self.input_width}x{self.input_height}")
        if self.color_order not in ("RGB", "BGR"):
            raise ManifestError(f"color_order must be RGB or BGR, got {self.color_order!r}")
        if self.layout != "NCHW":
            raise ManifestError(f"only NCHW layout is supported, got {self.layout!r}")
        if not 0 <= self.pad_value <= 255:
            raise ManifestError(f"pad_value must be in 0..255, got {self.pad_value}")


@dataclass(frozen=True)
class PostprocessSpec:
    """How to read the output tensor, and the NMS defaults requests may override."""

    output_layout: str = "xyxy_obj_cls"
    score_threshold: float = 0.25
    iou_threshold: float = 0.5
    max_detections: int = 100
    pre_nms_topk: int = 1000
    class_agnostic: bool = False

    def __post_init__(self) -> None:
        if self.output_layout not in OUTPUT_LAYOUTS:
            raise ManifestError(f"unknown output_layout {self.output_layout!r}; known: {OUTPUT_LAYOUTS}")
        if not 0.0 <= self.score_threshold <= 1.0 or not 0.0 < self.iou_threshold <= 1.0:
            raise ManifestError("score_threshold must be in [0, 1] and iou_threshold in (0, 1]")
        if self.max_detections <= 0 or self.pre_nms_topk <= 0:
            raise ManifestError("max_detections and pre_nms_topk must be positive")


@dataclass(frozen=True)
class Variant:
    """One deployable engine file and the evidence gathered for it at build time."""

    name: str
    file: str
    precision: str
    sha256: str = ""
    format: str = "onnx"  # "onnx" or "tensorrt"
    input_shape: tuple[int, ...] = ()  # e.g. (-1, 3, 384, 640); -1 = dynamic batch
    max_batch: int = 8
    macs: int = 0
    params: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    parity: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=lambda: {"passed": True, "reason": "not gated"})
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ManifestError(f"variant {self.name!r}: precision must be one of {PRECISIONS}")
        if not self.file or os.path.isabs(self.file) or ".." in Path(self.file).parts:
            raise ManifestError(f"variant {self.name!r}: file must be a relative path inside the artifact dir")


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
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # Directory the manifest was loaded from; not serialised.
    root: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.classes:
            raise ManifestError("manifest lists no classes")
        if not self.variants:
            raise ManifestError("manifest lists no variants")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ManifestError(f"duplicate variant names: {names}")
        if self.default_variant not in names:
            raise ManifestError(f"default_variant {self.default_variant!r} is not one of {names}")

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

    def path_of(self, variant: Variant) -> Path:
        if self.root is None:
            raise ManifestError("manifest was not loaded from a directory")
        return self.root / variant.file

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("root", None)
        return d


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tuple_fields(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: (tuple(v) if k in keys and isinstance(v, list) else v) for k, v in d.items()}


def manifest_from_dict(data: dict[str, Any], root: Path | None = None) -> Manifest:
    """Build and validate a Manifest from parsed JSON; unknown keys are an error."""
    try:
        if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version {data.get('schema_version')} is not supported (expected {SCHEMA_VERSION})"
            )
        pre = PreprocessSpec(**_tuple_fields(data["preprocess"], ("mean", "std")))
        post = PostprocessSpec(**data.get("postprocess", {}))
        variants = tuple(Variant(**_tuple_fields(v, ("input_shape",))) for v in data["variants"])
        rest = {k: v for k, v in data.items() if k not in ("preprocess", "postprocess", "variants", "classes")}
        return Manifest(
            classes=tuple(data["classes"]), preprocess=pre, postprocess=post, variants=variants, root=root, **rest
        )
    except ManifestError:
        raise
    except KeyError as exc:
        raise ManifestError(f"manifest is missing the key {exc}") from exc
    except TypeError as exc:
        raise ManifestError(f"manifest has a malformed or unknown field: {exc}") from exc


def load_manifest(path: str | os.PathLike[str], verify_checksums: bool = True) -> Manifest:
    """Load ``manifest.json`` (or a directory holding one) and check the files it names."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"{p}: no such manifest") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{p}: cannot read manifest: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{p}: manifest must be a JSON object")
    manifest = manifest_from_dict(data, root=p.parent.resolve())
    if verify_checksums:
        for v in manifest.variants:
            f = manifest.path_of(v)
            if v.format == "tensorrt":
                continue  # engines are built on the device; checked by their fingerprint
            if not f.is_file():
                raise ManifestError(f"{p}: variant {v.name!r} names {v.file}, which does not exist")
            if v.sha256 and sha256_file(f) != v.sha256:
                raise ManifestError(f"{p}: {v.file} does not match its sha256 in the manifest")
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
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the server may run as another user
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
