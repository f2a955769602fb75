"""A manifest from parsed JSON: nested objects to their types, schema 1 migrated to the current one."""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Any

from perception.errors import ManifestError
from perception.manifest.fields import tuple_fields
from perception.manifest.schema import (
    SCHEMA_VERSION,
    Calibration,
    EngineRecord,
    Manifest,
    PostprocessSpec,
    PreprocessSpec,
    QdqTwin,
    SourceFile,
    Variant,
    Verification,
    Weights,
)


def _sub(cls: type, value: Any, what: str, tuples: tuple[str, ...] = ()) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ManifestError(f"{what} must be an object")
    return cls(**tuple_fields(value, tuples))


def _variant_from_dict(v: Any) -> Variant:
    if not isinstance(v, dict):
        raise ManifestError(f"a variant must be an object, got {reprlib.repr(v)}")
    name = v.get("name", "?")
    d = tuple_fields(v, ("input_shape",))
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
        data = tuple_fields(data, ("classes",))
        rest = {k: v for k, v in data.items() if k not in ("preprocess", "postprocess", "variants", "classes")}
        if isinstance(rest.get("verification"), dict):
            ver = rest["verification"]
            rest["verification"] = Verification(
                tuple(_sub(SourceFile, f, "verification frame") for f in ver.get("frames", [])),
                dict(ver.get("expected", {})),
            )
        return Manifest(classes=data["classes"], preprocess=pre, postprocess=post, variants=variants, root=root, **rest)
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
            raise ManifestError(
                f"schema-1 variant {name!r} has no sha256 and cannot be verified; rebuild the artifact "
                "with `perception build`"
            )
        base = name.removeprefix("trt_")
        family = base.rsplit("_", 1)[0] if "_" in base else "base"
        v["family"] = family
        fp32 = f"{family}_fp32" if family != "base" else "fp32"
        if v.get("format") == "tensorrt":
            v["parent"] = str(extra.get("onnx_variant") or base)
            fp = extra.get("fingerprint") or {}
            v["engine"] = {
                k: fp[k]
                for k in (
                    "tensorrt_version",
                    "compute_capability",
                    "precision",
                    "onnx_sha256",
                    "max_batch",
                    "device_name",
                )
                if k in fp
            }
            v["source"] = {"file": "", "sha256": fp.get("onnx_sha256", "")}
            v["source"]["file"] = _v1_engine_source_file(out, v["parent"], v.get("precision", ""))
        elif name != fp32 and fp32 in names:
            v["parent"] = fp32
        if "checkpoint" in extra:
            v["weights"] = {
                "checkpoint": extra["checkpoint"],
                "sha256": extra.get("checkpoint_sha256", ""),
                "pruning": extra.get("pruning", {}),
            }
        if "calibrator" in extra or "calibration_sha256" in extra:
            v["calibration"] = {
                "calibrator": extra.get("calibrator", ""),
                "set_sha256": extra.get("calibration_sha256", ""),
                "fp32_nodes": list(extra.get("fp32_nodes", [])),
            }
        if isinstance(extra.get("tensorrt_qdq"), dict):
            q = extra["tensorrt_qdq"]
            v["tensorrt_qdq"] = {
                k: q[k] for k in ("file", "sha256", "calibrator", "activations", "metrics", "parity", "gate") if k in q
            }
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
