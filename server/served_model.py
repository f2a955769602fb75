"""One loaded model: its manifest, variant, engine and pipeline, and how one is loaded.

What the scheduler runs a batch on and what post-processes it; the model lifecycle
(``server.model_host``) swaps, rolls back and watches these.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from perception.manifest import Manifest, Variant, load_manifest
from perception.pipeline import FramePipeline
from server.runtime.base import Backend


@dataclass(eq=False)
class ServedModel:
    """One loaded model: what the scheduler runs a batch on, and what post-processes it."""

    manifest_path: str
    manifest: Manifest
    variant: Variant
    backend: Backend
    pipeline: FramePipeline
    max_batch: int
    loaded_at: float = field(default_factory=time.time)
    # Set by the host when it swaps the model in: "start", "load" (an operator's), "degrade" or
    # "recover" (the degrader's moves). A probation rollback of a move backs the degrader off.
    cause: str = "start"
    # The variant an operator chose for this version (a move keeps its predecessor's): what the
    # degrader climbs back to, whichever way the model came to be served (a rollback too).
    operator_variant: str = ""

    def __post_init__(self) -> None:
        if not self.operator_variant:
            self.operator_variant = self.variant.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def infer(self, batch: NDArray[np.float32]) -> Any:
        return self.backend.infer(batch)  # looked up each call: a health reload may replace it

    def to_batch(self, items: list[Any]) -> NDArray[np.float32]:
        return self.pipeline.to_batch(items)

    def describe(self) -> str:
        return f"{self.manifest.name} {self.version} ({self.variant.name})"


def recorded_latency_ratio(new: ServedModel, cur: ServedModel) -> float:
    """How much slower than ``cur`` the build measured ``new`` (p50s recorded in the manifests;
    1.0 when either lacks one): how much slower it may be here."""
    a, b = new.variant.latency_ms.get("p50"), cur.variant.latency_ms.get("p50")
    return float(a / b) if a and b else 1.0


def load_served_model(
    manifest_path: str, variant: str, make_backend: Callable[[Manifest, str], tuple[Backend, Variant]],
    pipeline_for: Callable[[Manifest], FramePipeline], warm_up: Callable[[Backend, FramePipeline, int], None],
    max_batch: int, *, manifest_bytes: bytes | None = None,
) -> ServedModel:
    """Load (every file checksummed), bind outputs to the layout, warm up: an activated model.

    manifest_bytes: the manifest as its signature was verified, parsed instead of the file
    (which may have changed since the check)."""
    manifest = load_manifest(manifest_path, content=manifest_bytes)
    backend, chosen = make_backend(manifest, variant)
    try:
        pipeline = pipeline_for(manifest)
        pipeline.bind_outputs(backend.outputs)
        batch = max(1, min(max_batch, backend.max_batch))
        warm_up(backend, pipeline, batch)
    except BaseException:
        backend.deactivate()
        raise
    return ServedModel(str(manifest_path), manifest, chosen, backend, pipeline, batch)
