"""The model lifecycle on a vehicle: hot swap with verification, rollback, and probation.

A new model is loaded BESIDE the served one (its files checksummed, its outputs bound to its
layout, warmed up), verified on the frames its artifact ships (it must still detect what its
build recorded for them, and its latency must be within bounds of the served model's on this
device), and only then swapped in. The swap is one assignment under a lock: frames prepared
after it go to the new model, frames already prepared for the old one are still inferred by it
(a batch never mixes models), so streams stay open and no frame is lost or answered twice. The
previous model stays loaded for ``rollback`` and for the automatic rollback of a probation
window in which the new model's error rate or p99 crosses its limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from perception.errors import ManifestError, ModelError, PerceptionError
from perception.manifest import Manifest, Variant, load_manifest
from perception.parity import parity
from perception.pipeline import FramePipeline, RequestOptions, file_frame
from perception.types import Detections
from server.runtime.base import Backend

log = logging.getLogger(__name__)


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

    @property
    def version(self) -> str:
        return self.manifest.version

    def infer(self, batch: NDArray[np.float32]) -> Any:
        return self.backend.infer(batch)  # looked up each call: a health reload may replace it

    def to_batch(self, items: list[Any]) -> NDArray[np.float32]:
        return self.pipeline.to_batch(items)

    def describe(self) -> str:
        return f"{self.manifest.name} {self.version} ({self.variant.name})"


@dataclass(frozen=True)
class LifecycleLimits:
    """How a new model is judged before and after it is swapped in."""

    max_changed: float = 0.10  # share of recorded detections that may vanish / appear on the shipped frames
    # vs the served model here, times the ratio their builds recorded; the least-disturbed of several
    # runs is compared, as in the build's gate (a shared CPU makes medians swing by 25 %)
    max_latency_ratio: float = 2.0
    # ... and slower by more than this: the ratio of two sub-millisecond times on a shared CPU is
    # noise (CI refused a tiny model at 0.12 ms against 0.03 ms).
    latency_slack_ms: float = 1.0
    probation_s: float = 60.0
    probation_min_batches: int = 5
    max_error_rate: float = 0.2  # failed batches / batches within probation
    max_p99_ms: float = 0.0  # 0 = judge p99 against the previous model's: > max(2x, + p99_slack_ms) rolls back
    # A p99 of a handful of batches is their maximum, and a sub-millisecond model's maximum on a
    # shared CPU is scheduling jitter: p99 is judged from this many successful batches on, and
    # against at least the previous p99 plus this slack (CI once rolled back a tiny model for
    # 1.7 ms against a 1.5 ms limit on 5 batches). A model whose median is over the limit is
    # rolled back from probation_min_batches on: one too slow to run 50 batches is not spared.
    probation_min_latency_batches: int = 50
    p99_slack_ms: float = 5.0


Loader = Callable[[str, str], ServedModel]  # (manifest path, variant) -> an activated model
# on_change(model, cause): ``model`` is now served; cause "load" (an operator's load: admin,
# SIGHUP), "degrade" / "recover" (the degrader's moves) or "rollback".
ChangeHook = Callable[[ServedModel, str], None]

# A dropped model is deactivated this long after the swap that dropped it: frames prepared for
# it are inferred within a few batches. Not measured: a margin over those batches.
DROPPED_DEACTIVATE_S = 5.0


class ModelHost:
    """The served model, the previous one, and the swaps between them. Thread-safe."""

    def __init__(self, first: ServedModel, loader: Loader, limits: LifecycleLimits | None = None,
                 on_change: ChangeHook | None = None,
                 on_event: Callable[[str], None] | None = None) -> None:
        self._lock = threading.RLock()
        self._notify_lock = threading.Lock()  # on_change calls, one at a time, for the model served
        self._current = first
        self._previous: ServedModel | None = None
        self._loader = loader
        self.limits = limits or LifecycleLimits()
        self._on_change = on_change
        self._on_event = on_event or (lambda _event: None)
        self.swaps = 0
        self.rollbacks = 0
        self.refusals = 0
        self.message = f"serving {first.describe()}"
        self._probation_until = 0.0
        self._probation_n = 0  # batches of the model on probation
        self._baseline_p99_s = 0.0
        self._latency_allowance = 1.0  # how much slower than the previous model its build measured it
        self._probation_errors = 0
        self._probation_ok_s: deque[float] = deque(maxlen=10_000)  # seconds of its successful batches
        self._recent: deque[float] = deque(maxlen=500)  # batch seconds of the served model, outside probation
        self._busy = threading.Lock()  # one load at a time

    # -- what is served --------------------------------------------------------------------

    @property
    def current(self) -> ServedModel:
        with self._lock:
            return self._current

    @property
    def previous(self) -> ServedModel | None:
        with self._lock:
            return self._previous

    @property
    def state(self) -> str:
        with self._lock:
            return "probation" if time.monotonic() < self._probation_until else "serving"

    # -- loading and swapping --------------------------------------------------------------

    def load_and_swap(self, manifest_path: str, variant: str = "", *, cause: str = "load", wait_s: float = 0.0,
                      expect_version: str = "") -> ServedModel:
        """Load, check, warm up and verify a model beside the served one, then swap it in.
        Raises ModelError / ManifestError with the reason; the served model is untouched then.

        ``wait_s``: how long to wait for a load in progress (0: refuse at once). ``expect_version``:
        refuse a manifest of another version (the degrader moves between the variants of the
        served version; an artifact replaced on disk is an operator's load, not a degrade step).
        ``cause`` is passed to ``on_change``."""
        acquired = self._busy.acquire(timeout=wait_s) if wait_s > 0 else self._busy.acquire(blocking=False)
        if not acquired:
            raise ModelError("another model is being loaded; try again when it is done")
        try:
            try:
                new = self._loader(manifest_path, variant)
            except Exception as exc:  # any failure to load is a refusal, with its reason
                error = self._refusal(manifest_path, exc)
                if error is exc:
                    raise
                raise error from exc
            try:
                if expect_version and new.version != expect_version:
                    raise ModelError(f"{manifest_path} is now version {new.version!r}, not the served "
                                     f"{expect_version!r}; it is loaded by a reload, not by this step")
                self.verify(new)
            except Exception as exc:  # the new model never served: free it whatever went wrong
                new.backend.deactivate()
                error = self._refusal(new.describe(), exc)
                if error is exc:
                    raise
                raise error from exc
            self.swap_in(new, cause=cause)
            return new
        finally:
            self._busy.release()

    def _refusal(self, what: str, exc: Exception) -> PerceptionError:
        """Record the refusal of ``what``; the error to raise: ``exc`` itself when it says why in
        the project's terms, else a ModelError naming its type."""
        self._refused(f"{what}: {exc}")
        if isinstance(exc, (ModelError, ManifestError)):
            return exc
        return ModelError(f"{what}: {type(exc).__name__}: {exc}")

    def _refused(self, why: str) -> None:
        with self._lock:
            self.refusals += 1
            self.message = f"refused {why}; still serving {self._current.describe()}"
        self._on_event("refused")
        log.error("model load refused: %s", why)

    def swap_in(self, new: ServedModel, probation: bool = True, cause: str = "load") -> None:
        """Serve ``new`` from the next prepared frame on; keep the served one for a rollback.

        A model swapped out while still on probation has not earned that place: the model to
        roll back to stays the one before it (the last that served through its probation), with
        its latency baseline, and the unproven one is dropped. A degrade step or a second load
        within a probation window would otherwise have made the unproven model the fallback and
        dropped the good one."""
        with self._lock:
            old = self._current
            unproven = time.monotonic() < self._probation_until and self._previous is not None
            dropped: ServedModel | None
            if unproven:
                dropped = old
            else:
                dropped, self._previous = self._previous, old
                self._baseline_p99_s = float(np.percentile(self._recent, 99)) if self._recent else 0.0
            self._current = new
            self.swaps += 1
            fallback = self._previous
            self._latency_allowance = max(1.0, self._recorded_ratio(new, fallback)) if fallback is not None else 1.0
            self._probation_n = self._probation_errors = 0
            self._probation_ok_s.clear()
            self._recent.clear()
            self._probation_until = time.monotonic() + self.limits.probation_s if probation else 0.0
            self.message = f"serving {new.describe()} (was {old.describe()})"
        log.info("swapped in %s (was %s%s)", new.describe(), old.describe(),
                 ", still on probation: dropped" if unproven else "")
        self._on_event("swap")
        if dropped is not None and dropped is not new and dropped is not fallback:
            timer = threading.Timer(DROPPED_DEACTIVATE_S, dropped.backend.deactivate)
            timer.daemon = True  # the process's end frees it anyway
            timer.start()
        self._notify(new, cause)

    def rollback(self, reason: str = "asked for", expect: ServedModel | None = None) -> ServedModel:
        """Serve the previous model again (the current one is kept as the new previous). With
        ``expect``, only if that model is still the one served: two failed batches of a model on
        probation judged at once roll it back once, not back and forth."""
        with self._lock:
            if expect is not None and self._current is not expect:
                return self._current
            if self._previous is None:
                raise ModelError("there is no previous model to roll back to")
            back, off = self._previous, self._current
            self._current, self._previous = back, off
            self.rollbacks += 1
            self._probation_until = 0.0
            self._recent.clear()
            self.message = f"rolled back to {back.describe()} from {off.describe()}: {reason}"
        log.warning("rolled back to %s from %s: %s", back.describe(), off.describe(), reason)
        self._on_event("rollback")
        self._notify(back, "rollback")
        return back

    def _notify(self, model: ServedModel, cause: str) -> None:
        """``on_change`` for ``model``, unless another change has replaced it since: calls come
        one at a time, and the last one made is for the model served (two changes racing, a
        swap and a rollback, used to leave the model info of the one not served)."""
        if self._on_change is None:
            return
        with self._notify_lock:
            if self.current is model:
                self._on_change(model, cause)

    # -- verification before the swap ------------------------------------------------------

    def verify(self, new: ServedModel) -> None:
        """ModelError unless ``new`` detects on its shipped frames what its build recorded (within
        ``max_changed``) and its latency there is within bounds of the served model's."""
        ver = new.manifest.verification
        if ver is None or not ver.frames:
            log.warning("%s ships no verification frames: checked for latency only", new.describe())
            frames: list[Path | None] = [None]
        else:
            frames = [new.manifest.path_of(f.file) for f in ver.frames]
        got, new_s = self._run(new, frames)
        if ver is not None and ver.frames:
            expected = self._expected(new)
            if expected is not None:
                par = parity(expected, got)
                worst = max(par["vanished"], par["appeared"])
                if worst > self.limits.max_changed:
                    raise ModelError(f"fails its verification frames: {par['vanished']:.0%} of the recorded detections "
                                     f"vanished, {par['appeared']:.0%} appeared (limit {self.limits.max_changed:.0%})")
        try:
            _, cur_s = self._run(self.current, frames)
        except Exception as exc:  # the served model failing here is no reason to refuse its replacement
            log.warning("the served model %s fails on the verification frames (%s: %s): the latency of %s is not "
                        "compared", self.current.describe(), type(exc).__name__, exc, new.describe())
            cur_s = 0.0
        recorded = self._recorded_ratio(new, self.current)
        limit = self.limits.max_latency_ratio * max(1.0, recorded)
        if cur_s > 0 and new_s / cur_s > limit and new_s - cur_s > self.limits.latency_slack_ms / 1e3:
            raise ModelError(f"too slow here: {1e3 * new_s:.2f} ms per frame vs {1e3 * cur_s:.2f} ms for the served "
                             f"model ({new_s / cur_s:.2f}x; limit {limit:.2f}x)")

    def _expected(self, m: ServedModel) -> list[Detections] | None:
        ver = m.manifest.verification
        assert ver is not None
        name = m.variant.name if m.variant.name in ver.expected else m.variant.parent
        rows = ver.expected.get(name)
        if rows is None:
            return None
        out = []
        for frame in rows:
            a = np.asarray(frame, np.float32).reshape(-1, 6)
            out.append(Detections(a[:, :4].copy(), a[:, 4].copy(), a[:, 5].astype(np.int64)))
        return out

    @staticmethod
    def _recorded_ratio(new: ServedModel, cur: ServedModel) -> float:
        a, b = new.variant.latency_ms.get("p50"), cur.variant.latency_ms.get("p50")
        return float(a / b) if a and b else 1.0

    @staticmethod
    def _run(m: ServedModel, frames: Sequence[Path | None]) -> tuple[list[Detections], float]:
        """Detections of each frame (deployed threshold) and the least-disturbed batch-1 inference time."""
        dets: list[Detections] = []
        times: list[float] = []
        for i, f in enumerate(frames):
            if f is None:
                x = np.zeros((1, 3, m.pipeline.spec.input_height, m.pipeline.spec.input_width), np.float32)
                prepared = None
            else:
                prepared = m.pipeline.prepare(file_frame(f, i, "verify"), RequestOptions())
                x = m.pipeline.to_batch([prepared.tensor])
            for _ in range(5):
                t0 = time.perf_counter()
                out = m.infer(x)
                times.append(time.perf_counter() - t0)
            if prepared is not None:
                dets.append(m.pipeline.finish({n: a[0] for n, a in out.items()}, prepared))
        return dets, float(np.min(times))

    # -- probation -------------------------------------------------------------------------

    def observe(self, ok: bool, model: Any, seconds: float) -> None:
        """Scheduler callback after every batch; rolls back a model failing its probation.

        The error rate is judged at every batch; the latency (a sort of up to 10,000 batch
        times, under the lock) at every batch of the first 100 and every 16th after. The p99
        limit scales with how much slower than its fallback the new model's build measured it
        (a recover step up to a slower variant is expected to be slower), as verification does."""
        with self._lock:
            if model is not self._current:
                return
            if time.monotonic() >= self._probation_until:
                if ok:
                    self._recent.append(seconds)
                return
            self._probation_n += 1
            if ok:
                self._probation_ok_s.append(seconds)
            else:
                self._probation_errors += 1
            n = self._probation_n
            if n < self.limits.probation_min_batches:
                return
            errors = self._probation_errors / n
            p50 = p99 = limit_p99 = 0.0
            if n <= 100 or n % 16 == 0:
                ok_s = np.fromiter(self._probation_ok_s, np.float64, len(self._probation_ok_s))
                p99 = float(np.percentile(ok_s, 99)) if ok_s.size >= self.limits.probation_min_latency_batches else 0.0
                p50 = float(np.median(ok_s)) if ok_s.size >= self.limits.probation_min_batches else 0.0
                base = self._baseline_p99_s * self._latency_allowance
                limit_p99 = (self.limits.max_p99_ms / 1e3 if self.limits.max_p99_ms
                             else max(2.0 * base, base + self.limits.p99_slack_ms / 1e3) if base > 0 else 0.0)
        if errors > self.limits.max_error_rate:
            self.rollback(f"{errors:.0%} of its batches failed in probation (limit {self.limits.max_error_rate:.0%})",
                          expect=model)
        elif limit_p99 > 0 and p50 > limit_p99:
            self.rollback(f"its inference median {1e3 * p50:.1f} ms crossed the p99 limit {1e3 * limit_p99:.1f} ms "
                          "in probation", expect=model)
        elif limit_p99 > 0 and p99 > limit_p99:
            self.rollback(f"its inference p99 {1e3 * p99:.1f} ms crossed {1e3 * limit_p99:.1f} ms in probation",
                          expect=model)

    def status(self) -> dict[str, Any]:
        with self._lock:
            cur, prev = self._current, self._previous
            return {"version": cur.version, "variant": cur.variant.name, "manifest_path": cur.manifest_path,
                    "previous_version": prev.version if prev else "",
                    "previous_variant": prev.variant.name if prev else "",
                    "state": self.state, "message": self.message, "swaps": self.swaps, "rollbacks": self.rollbacks}

    def deactivate_all(self) -> None:
        with self._lock:
            models = [m for m in (self._current, self._previous) if m is not None]
        for m in models:
            m.backend.deactivate()


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
