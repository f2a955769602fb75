"""One loaded model: its manifest, variant, engine and pipeline, and how one is loaded.

What the scheduler runs a batch on and what post-processes it; the model lifecycle
(``server.model_host``) swaps, rolls back and watches these.

A model's engine is freed when the host no longer keeps the model AND no run holds it: every
``infer`` holds a lease on the model (``ModelUses``) for its duration, and the host retires a
model it drops instead of freeing it, so the last lease released frees it. A slow run is never
left running on a freed session, however long it takes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from perception.errors import ModelError
from perception.manifest import Manifest, Variant, load_manifest
from perception.pipeline import FramePipeline, frame_outputs
from server.model_stats import InferenceStats, stats_for
from server.runtime.base import Backend

log = logging.getLogger(__name__)


class ModelUses:
    """The leases on one model's engine, and its freeing at the last one once retired. Thread-safe.

    ``acquire`` takes a lease (False once the engine is freed: nothing is taken then), ``release``
    gives it back; ``retire`` says the engine is nobody's to keep any more: it is freed at once if
    no lease is held, else by whichever ``release`` gives back the last one (on that thread).
    ``free`` is called exactly once, outside the lock; its exception is logged, not raised (it
    would otherwise replace the result of the run that released last).

    A lease never released (a run stuck in the driver) keeps the engine allocated until the
    process ends: freeing a session under a running call is worse than leaking it."""

    def __init__(self, free: Callable[[], None]) -> None:
        self._free = free
        self._lock = threading.Lock()
        self._held = 0
        self._retired = False
        self._freed = False

    @property
    def held(self) -> int:
        """Leases held now."""
        with self._lock:
            return self._held

    @property
    def freed(self) -> bool:
        with self._lock:
            return self._freed

    def acquire(self) -> bool:
        """Take a lease; False (none taken) if the engine was freed. A retired engine not yet
        freed can still be leased: something already holding it may start another run."""
        with self._lock:
            if self._freed:
                return False
            self._held += 1
            return True

    def release(self) -> None:
        """Give a lease back; the last one of a retired engine frees it. RuntimeError if none is held."""
        with self._lock:
            if self._held <= 0:
                raise RuntimeError("a model lease was released that was never acquired")
            self._held -= 1
            free = self._take_free_locked()
        if free:
            self._call_free()

    def retire(self) -> None:
        """Free the engine once no lease is held: now if none is. Idempotent."""
        with self._lock:
            self._retired = True
            free = self._take_free_locked()
        if free:
            self._call_free()

    def _take_free_locked(self) -> bool:
        if self._retired and self._held == 0 and not self._freed:
            self._freed = True
            return True
        return False

    def _call_free(self) -> None:
        try:
            self._free()
        except Exception:  # the run that released last has its answer; the engine's error is logged
            log.exception("freeing a retired model's engine failed")


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

    # Who runs on the engine; the host retires the model when it drops it (``ModelUses``).
    uses: ModelUses = field(init=False, repr=False)
    # Its version's inferences for clients, as Triton's ModelStatistics reports them (shared by
    # every loaded model of the version: ``server.model_stats.stats_for``).
    stats: InferenceStats = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.operator_variant:
            self.operator_variant = self.variant.name
        # The backend is looked up when it is freed: a health reload may have replaced it.
        self.uses = ModelUses(lambda: self.backend.deactivate())
        self.stats = stats_for(self.manifest.name, self.version)

    @property
    def version(self) -> str:
        return self.manifest.version

    @contextmanager
    def lease(self) -> Iterator[ServedModel]:
        """Hold the engine for the block: it is not freed before the block ends. ModelError if it
        was freed already (the model was dropped and nothing held it)."""
        if not self.uses.acquire():
            raise ModelError(f"{self.describe()} was swapped out and its engine freed")
        try:
            yield self
        finally:
            self.uses.release()

    def infer(self, batch: NDArray[np.float32]) -> Any:
        """The engine's outputs for ``batch``, run under a lease (``lease``).

        The backend is looked up each call: a health reload may replace it. A run that took the
        old one just before the reload freed it finds it deactivated; it runs again on the new
        one, instead of failing its frames (and counting towards another reload)."""
        with self.lease():
            backend = self.backend
            try:
                out = backend.infer(batch)
            except ModelError:
                if self.backend is backend:
                    raise
                log.info("%s: its engine was reloaded under a run; running it on the new one", self.describe())
                out = self.backend.infer(batch)
        return out

    def frame_outputs(self, outputs: Any, index: int) -> dict[str, Any]:
        """Frame ``index``'s outputs of a run; ModelError if what the decoder reads of them holds
        no finite value (``FramePipeline.check_frame``): that frame fails, not its batch."""
        out = frame_outputs(outputs, index)
        self.pipeline.check_frame(out)
        return out

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
