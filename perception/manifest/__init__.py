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

The package: ``schema`` (the types), ``fields`` (the checks they run), ``parse`` (JSON to
types, schema-1 migration) and ``files`` (load with checksums, save atomically). Import from
the package: its names below are the API.
"""

from perception.manifest.fields import check_relative
from perception.manifest.files import check_file, load_manifest, read_checked, save_manifest, sha256_file
from perception.manifest.parse import manifest_from_dict, migrate_v1
from perception.manifest.schema import (
    MAX_BATCH_LIMIT,
    MAX_CLASSES,
    MAX_INPUT_SIDE,
    MAX_PRE_NMS_TOPK,
    SCHEMA_VERSION,
    Calibration,
    EngineRecord,
    Manifest,
    PostprocessSpec,
    Precision,
    PreprocessSpec,
    Priors,
    QdqTwin,
    SourceFile,
    Variant,
    VariantFormat,
    Verification,
    Weights,
)

__all__ = [
    "MAX_BATCH_LIMIT",
    "MAX_CLASSES",
    "MAX_INPUT_SIDE",
    "MAX_PRE_NMS_TOPK",
    "SCHEMA_VERSION",
    "Calibration",
    "EngineRecord",
    "Manifest",
    "PostprocessSpec",
    "Precision",
    "PreprocessSpec",
    "Priors",
    "QdqTwin",
    "SourceFile",
    "Variant",
    "VariantFormat",
    "Verification",
    "Weights",
    "check_file",
    "check_relative",
    "load_manifest",
    "manifest_from_dict",
    "migrate_v1",
    "read_checked",
    "save_manifest",
    "sha256_file",
]
