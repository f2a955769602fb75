"""The model lifecycle on a vehicle: hot swap with verification, rollback, and probation.

A new model is loaded BESIDE the served one (its files checksummed, its outputs bound to its
layout, warmed up), verified on the frames its artifact ships (it must still detect what its
build recorded for them, and its latency must be within bounds of the served model's on this
device), and only then swapped in. The swap is one assignment under a lock: frames prepared
after it go to the new model, frames already prepared for the old one are still inferred by it
(a batch never mixes models), so streams stay open and no frame is lost or answered twice. The
previous model stays loaded for ``rollback`` and for the automatic rollback of a model that fails
its probation (``server.probation``).

"Previous" is the operator's fallback: the model an operator's load (admin, SIGHUP) replaced.
The degrader's moves between the variants of the served version do not take that place (they
used to, so that a degrade and a recover left Rollback with a variant of the same version and
the older version freed): the variant a move leaves is kept only while the variant it moved to
is on probation, as what that probation rolls back to, then freed.

A model no longer kept is retired, not freed on the spot: its engine is freed when the last
run holding it ends (``server.served_model.ModelUses``), never under a run however long it takes.
The frames prepared for it but not yet in a batch hold no lease of their own: the host holds
one for them for ``DROPPED_DEACTIVATE_S`` after the drop. An engine a health recovery gives a
model dropped meanwhile serves those frames, and is freed with the model.

Change hooks (``on_change``) are called outside every lock of the host, one at a time and in
the order of the changes (``server.model_changes``). A slow hook delays no change of model (each
is made under the lock at once) and no load after its own, but the caller of a change returns
once its own hook ran (and gets its exception), after the hooks of the changes before it. A hook
may call back into the host: a change it makes is delivered after its own call returns. A change
is delivered whatever fails between it and its delivery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from perception.errors import ManifestError, ModelError, PerceptionError
from perception.manifest import load_manifest
from server.model_changes import Change, ChangeHook, ChangeQueue
from server.probation import Probation, ProbationLimits
from server.runtime.base import Backend
from server.served_model import ServedModel
from server.verification import verify_before_swap

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LifecycleLimits(ProbationLimits):
    """How a new model is judged before it is swapped in, and after (``ProbationLimits``)."""

    max_changed: float = 0.10  # share of recorded detections that may vanish / appear on the shipped frames
    # vs the served model here, times the ratio their builds recorded; the least-disturbed of several
    # runs is compared, as in the build's gate (a shared CPU makes medians swing by 25 %)
    max_latency_ratio: float = 2.0
    # ... and slower by more than this: the ratio of two sub-millisecond times on a shared CPU is
    # noise (CI refused a tiny model at 0.12 ms against 0.03 ms).
    latency_slack_ms: float = 1.0


Loader = Callable[[str, str], ServedModel]  # (manifest path, variant) -> an activated model

# A dropped model's engine is held this long after the swap that dropped it, for the frames
# prepared for it but not yet in a batch (they hold no lease: they are inferred within a few
# batches); then it is freed when its last run ends. Not measured: a margin over those batches.
DROPPED_DEACTIVATE_S = 5.0

STEP_CAUSES = ("degrade", "recover")  # the degrader's moves between the variants of one version


class RollbackRecord(NamedTuple):
    """The last rollback: the model served again, the one rolled off, and whether probation did it."""

    back: ServedModel
    off: ServedModel
    automatic: bool


@dataclass(frozen=True)
class _Swapped:
    """A swap made under the lock, for what follows it outside (``ModelHost._after_swap``)."""

    new: ServedModel
    old: ServedModel
    cause: str
    unproven: bool  # the model swapped out was still on probation: dropped
    dropped: list[ServedModel]
    settle_s: float  # when to free the variant a move left (0: none is kept)
    change: Change | None


@dataclass(frozen=True)
class _RolledBack:
    """A rollback made under the lock, for what follows it outside (``ModelHost._after_rollback``)."""

    back: ServedModel
    off: ServedModel
    reason: str
    again: bool
    dropped: list[ServedModel]
    change: Change | None


class ModelHost:
    """The served model, the operator's previous one, and the swaps between them. Thread-safe."""

    def __init__(self, first: ServedModel, loader: Loader, limits: LifecycleLimits | None = None,
                 on_change: ChangeHook | None = None,
                 on_event: Callable[[str], None] | None = None) -> None:
        self._lock = threading.RLock()
        self._current = first
        self._previous: ServedModel | None = None  # the operator's fallback: what Rollback serves
        # The variant a degrade / recover move left, kept while the variant it moved to is on
        # probation: what that probation rolls back to. None outside such a window.
        self._left: ServedModel | None = None
        # The model probation last rolled off (kept as the previous one), or one an operator's
        # Rollback took off before its probation ended (``_cut_short``): a rollback into it starts
        # a probation window again, instead of serving a failed (or unproven) model unwatched.
        self._rolled_off: ServedModel | None = None
        self._cut_short = False
        self._closed = False  # shutdown began: no swap any more (it would serve a freed engine)
        self._freed = False  # deactivate_all ran: an engine given to a model now is nobody's to free
        self._loader = loader
        self.limits = limits or LifecycleLimits()
        # Recorded under the lock in the order of the changes, delivered to on_change outside it.
        self._changes = ChangeQueue(on_change, lambda: self.current)
        self._on_event = on_event or (lambda _event: None)
        self.swaps = 0
        self.rollbacks = 0
        self.refusals = 0
        self.last_rollback: RollbackRecord | None = None
        self.message = f"serving {first.describe()}"
        self._probation = Probation(self.limits)
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
    def left(self) -> ServedModel | None:
        """The variant a degrade / recover move on probation left (what its probation rolls back to)."""
        with self._lock:
            return self._left

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    @property
    def state(self) -> str:
        """"probation" while a change is on probation; else "degraded" while a lighter variant
        than the operator's serves (the admin service's contract: it said "serving"), else
        "serving"."""
        with self._lock:
            if self._probation.on(time.monotonic()):
                return "probation"
            cur = self._current
            return "degraded" if cur.variant.name != cur.operator_variant else "serving"

    def holds(self, model: ServedModel) -> bool:
        """Whether ``model`` is still kept (served, previous, or left by a move on probation):
        a model no longer held is, or is about to be, deactivated."""
        with self._lock:
            return not self._freed and self._holds(model)

    def _holds(self, model: ServedModel | None) -> bool:
        return model is not None and any(model is m for m in (self._current, self._previous, self._left))

    def replace_backend(self, model: ServedModel, backend: Backend) -> Backend:
        """Give ``model`` a freshly loaded backend (health recovery); returns the one replaced,
        which is the caller's to free.

        Under the lock, so that a drop cannot slip between the check and the assignment. A model
        no longer kept (dropped, or every model freed at shutdown) keeps the new backend for what
        still holds it (the frames prepared for it, under the host's grace lease; runs): it is
        freed with the model, by the last lease released, which looks the backend up then. It
        used to be freed here at once, and every such frame failed. Only a model whose engine
        is freed already (no lease can be taken) has it freed here."""
        with self._lock:
            old, model.backend = model.backend, backend
            kept = not self._freed and self._holds(model)
            leased = not kept and model.uses.acquire()
        if leased:  # given back at once: if it is the last, the new backend is freed now
            log.info("%s is no longer kept: its reloaded backend is freed with it", model.describe())
            model.uses.release()
        elif not kept:
            log.info("%s was freed: so is its reloaded backend", model.describe())
            backend.deactivate()
        return old

    def close(self) -> None:
        """Shutdown began: every later swap is refused (and its new model freed), so none can
        complete after ``deactivate_all`` freed the engines; a rollback is refused too."""
        with self._lock:
            self._closed = True

    def check_open(self) -> None:
        """ModelError once shutdown began. A load checks it between its steps (loading the
        engine, warming it up, verifying it): one still running at shutdown stops at its next
        step, its model freed, instead of going on for minutes (a TensorRT build, a warm-up)
        on a model that can no longer be served."""
        if self.closed:
            raise ModelError("the server is shutting down")

    # -- loading and swapping --------------------------------------------------------------

    def load_and_swap(self, manifest_path: str, variant: str = "", *, cause: str = "load", wait_s: float = 0.0,
                      expect_version: str = "", base: ServedModel | None = None) -> ServedModel:
        """Load, check, warm up and verify a model beside the served one, then swap it in.
        Raises ModelError / ManifestError with the reason; the served model is untouched then.

        ``wait_s``: how long to wait for a load in progress (0: refuse at once). ``expect_version``:
        refuse a manifest of another version (the degrader moves between the variants of the
        served version; an artifact replaced on disk is an operator's load, not a degrade step),
        read from the manifest alone before anything is loaded. ``base``: the model a degrade /
        recover step was computed from (default: the one served when the step starts); the step
        is refused if another model is served by the time it would swap, e.g. after a rollback
        during its load, which it would otherwise undo. ``cause`` is passed to ``on_change``, once
        the next load may start: a slow hook used to make that one fail (or wait) as "another
        model is being loaded"."""
        acquired = self._busy.acquire(timeout=wait_s) if wait_s > 0 else self._busy.acquire(blocking=False)
        if not acquired:
            raise ModelError("another model is being loaded; try again when it is done")
        try:
            if cause in STEP_CAUSES and base is None:
                base = self.current
            self._precheck(manifest_path, expect_version, base)
            try:
                new = self._loader(manifest_path, variant)
            except Exception as exc:  # any failure to load is a refusal, with its reason
                error = self._refusal(manifest_path, exc)
                if error is exc:
                    raise
                raise error from exc
            try:
                self.check_open()
                if expect_version and new.version != expect_version:  # replaced on disk since the pre-check
                    raise ModelError(f"{manifest_path} is now version {new.version!r}, not the served "
                                     f"{expect_version!r}; it is loaded by a reload, not by this step")
                self.verify(new)
            except Exception as exc:  # the new model never served: free it whatever went wrong
                new.backend.deactivate()
                error = self._refusal(new.describe(), exc)
                if error is exc:
                    raise
                raise error from exc
            swapped = self._swap(new, True, cause, base)
        finally:
            self._busy.release()
        self._after_swap(swapped)
        return new

    def _precheck(self, manifest_path: str, expect_version: str, base: ServedModel | None) -> None:
        """Refuse before loading what would be refused after: a load is seconds of a CPU (minutes
        of a TensorRT build) that a degrade step under load can least afford. The manifest is
        parsed alone (no checksums, nothing loaded) to read its version."""
        why = ""
        with self._lock:
            if self._closed:
                why = "the server is shutting down"
            elif base is not None and self._current is not base:
                why = (f"the served model changed to {self._current.describe()} since this step was computed "
                       f"from {base.describe()}")
        if why:
            error = ModelError(f"{manifest_path}: {why}")
            self._refused(str(error))
            raise error
        if not expect_version:
            return
        try:
            version = load_manifest(manifest_path, verify_checksums=False).version
        except ManifestError as exc:
            self._refused(f"{manifest_path}: {exc}")
            raise
        if version != expect_version:
            error = ModelError(f"{manifest_path} is now version {version!r}, not the served {expect_version!r}; "
                               "it is loaded by a reload, not by this step")
            self._refused(str(error))
            raise error

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

    def swap_in(self, new: ServedModel, probation: bool = True, cause: str = "load",
                base: ServedModel | None = None) -> None:
        """Serve ``new`` from the next prepared frame on.

        An operator's load keeps the served model as the previous one (Rollback's). A degrade /
        recover move does not: the previous one stays the operator's fallback, and the variant
        the move leaves is kept only while ``new`` is on probation (what that probation rolls
        back to), then freed.

        A model swapped out while still on probation has not earned a place: the model to roll
        back to stays the one before it (the last that served through its probation), with its
        latency baseline, and the unproven one is dropped. A degrade step or a second load
        within a probation window would otherwise have made the unproven model the fallback and
        dropped the good one.

        Refused (``new`` freed, ModelError) once the host is closed, or when ``base`` is given
        and is no longer the model served. Returns once ``on_change`` ran for it."""
        self._after_swap(self._swap(new, probation, cause, base))

    def _swap(self, new: ServedModel, probation: bool, cause: str, base: ServedModel | None) -> _Swapped:
        """``swap_in``'s change of models, made under the lock with its change hook queued, for
        ``_after_swap``; or its refusal."""
        step = cause in STEP_CAUSES
        with self._lock:
            why = ""
            if self._closed:
                why = "the server is shutting down"
            elif base is not None and self._current is not base:
                why = (f"the served model changed to {self._current.describe()} while it was loaded; this "
                       f"{cause} step was computed from {base.describe()}")
            if not why:
                now = time.monotonic()
                pending = self._expire_left(now)
                old = self._current
                fallback_before = self._left if self._left is not None else self._previous
                unproven = self._probation.on(now) and fallback_before is not None
                if unproven:
                    pending.append(old)
                    if not step and self._left is not None:
                        # An operator's load during a move's probation: the proven variant the
                        # move left is the version to go back to, not the one before it.
                        pending.append(self._previous)
                        self._previous, self._left = self._left, None
                else:
                    self._probation.measure_baseline()
                    if step:
                        pending.append(self._left)
                        watched = probation and self.limits.probation_s > 0
                        self._left = old if watched else None
                        if not watched:
                            pending.append(old)
                    else:
                        pending += [self._previous, self._left]
                        self._previous, self._left = old, None
                new.cause = cause
                new.operator_variant = old.operator_variant if step else new.variant.name
                self._current = new
                self.swaps += 1
                if probation:
                    self._probation.start(now, new, self._left if self._left is not None else self._previous)
                else:
                    self._probation.end()
                self.message = f"serving {new.describe()} (was {old.describe()})"
                settle_s = self.limits.probation_s if self._left is not None else 0.0
                dropped = self._unheld(pending, new)
                change = self._changes.record(new, cause)  # last: nothing raises before its delivery
                return _Swapped(new, old, cause, unproven, dropped, settle_s, change)
        new.backend.deactivate()
        error = ModelError(f"{new.describe()}: {why}")
        self._refused(str(error))
        raise error

    def _after_swap(self, done: _Swapped) -> None:
        """Outside every lock: what follows a swap (log, event, drops, settle timer), then its
        change hook, delivered whatever failed before."""
        try:
            log.info("swapped in %s by %s (was %s%s)", done.new.describe(), done.cause, done.old.describe(),
                     ", still on probation: dropped" if done.unproven else "")
            self._on_event("swap")
            self._drop_later(done.dropped)
            if done.settle_s > 0:  # free the variant left once its successor served its probation, traffic or not
                timer = threading.Timer(done.settle_s + 0.01, self._settle)
                timer.daemon = True
                timer.start()
        finally:
            self._changes.deliver(done.change)

    def _expire_left(self, now: float) -> list[ServedModel | None]:
        """Under the lock: the variant a move left, once its successor served through probation
        (returned for dropping); and the mark of a model probation rolled off, once it served
        through a probation window of its own."""
        if self._probation.on(now):
            return []
        if self._rolled_off is self._current:
            self._rolled_off = None
        left, self._left = self._left, None
        return [left]

    def _settle(self) -> None:
        with self._lock:
            dropped = self._unheld(self._expire_left(time.monotonic()))
        self._drop_later(dropped)

    def _unheld(self, models: Sequence[ServedModel | None], *keep: ServedModel) -> list[ServedModel]:
        """Under the lock: those of ``models`` no longer held, once each; forgets the rolled-off
        mark of a model dropped."""
        out: list[ServedModel] = []
        for m in models:
            if m is None or self._holds(m) or any(m is k for k in keep) or any(m is o for o in out):
                continue
            out.append(m)
            if self._rolled_off is m:
                self._rolled_off = None
        return out

    @staticmethod
    def _drop_later(models: Sequence[ServedModel]) -> None:
        """Retire each model, holding a lease on it for DROPPED_DEACTIVATE_S for the frames
        prepared for it and not yet in a batch: it is freed when that lease and every run's is
        released, its backend looked up then (a health recovery may have given it another one).

        A run that never ends (stuck in the driver) keeps the engine until the process ends,
        said in the log when the grace ends. A grace whose timer cannot start is given up (its
        engine freed once no run holds it, not never), the other models are retired all the
        same, and the first such error is raised after."""
        failed: BaseException | None = None
        for m in models:
            if not m.uses.acquire():
                continue  # freed already: nothing holds it
            m.uses.retire()
            try:
                timer = threading.Timer(DROPPED_DEACTIVATE_S, ModelHost._end_grace, (m,))
                timer.daemon = True  # the process's end frees it anyway
                timer.start()
            except BaseException as exc:  # e.g. no thread to be had
                m.uses.release()
                failed = failed or exc
        if failed is not None:
            raise failed

    @staticmethod
    def _end_grace(model: ServedModel) -> None:
        model.uses.release()
        running = model.uses.held
        if running:
            log.warning("%s was dropped %.0f s ago and %d run(s) still hold it: its engine is freed "
                        "when the last one ends", model.describe(), DROPPED_DEACTIVATE_S, running)

    def rollback(self, reason: str = "asked for", expect: ServedModel | None = None) -> ServedModel:
        """Serve the previous model again. Without ``expect`` (an operator's Rollback) that is
        the operator's previous model, and the one rolled off becomes the previous (during a
        move's probation: the proven variant the move left, the unproven one is dropped). With
        ``expect`` (probation's), only if that model is still the one served (two failed batches
        of a model on probation judged at once roll it back once, not back and forth); a
        degrade / recover move is rolled back to the variant it left.

        A rollback into a model that probation rolled off starts a probation window again: it
        failed once, and would otherwise serve unwatched."""
        with self._lock:
            done = self._rollback_locked(reason, expect)
        return self._after_rollback(done) if isinstance(done, _RolledBack) else done

    def _rollback_locked(self, reason: str, expect: ServedModel | None) -> _RolledBack | ServedModel:
        """Under the lock: ``rollback``'s change of models; the model served if there is none
        to make (probation's, for a model no longer served, or after shutdown). ``observe``
        calls it within the same hold of the lock as its judgement: a probation that ended
        between the two would otherwise have let the variant a move left go, and the rollback
        then served the operator's previous model instead."""
        automatic = expect is not None
        if automatic and self._current is not expect:
            return self._current
        if self._closed:
            if automatic:
                return self._current
            raise ModelError("the server is shutting down")
        now = time.monotonic()
        to_left = automatic and self._left is not None
        back_to = self._left if to_left else self._previous
        if back_to is None:
            raise ModelError("there is no previous model to roll back to")
        back = back_to
        # Probation's rollback goes to the variant the move left even when the probation's
        # time ran out since the judgement (it was judged within it).
        pending = [] if automatic else self._expire_left(now)
        off = self._current
        if to_left:
            self._left = None
            pending.append(off)
            self._current = back
        else:
            keep = off
            if self._left is not None:
                keep, self._left = self._left, None
                pending.append(off)
            elif not automatic and self._probation.on(now):
                # The operator took it off before its probation ended: served again by a second
                # Rollback, it used to be served unwatched, never having passed probation.
                self._rolled_off, self._cut_short = off, True
            self._current, self._previous = back, keep
            if automatic:
                self._rolled_off, self._cut_short = off, False
        again = not automatic and back is self._rolled_off
        self.rollbacks += 1
        if again:
            self._probation.measure_baseline(keep=True)
            self._probation.start(now, back, self._previous)
        else:
            self._probation.end()
        self.last_rollback = RollbackRecord(back, off, automatic)
        why_again = ("a rollback cut its probation short before" if self._cut_short
                     else "probation rolled it back before")
        self.message = (f"rolled back to {back.describe()} from {off.describe()}: {reason}"
                        + (f"; on probation again: {why_again}" if again else ""))
        dropped = self._unheld(pending)
        change = self._changes.record(back, "rollback")  # last: nothing raises before its delivery
        return _RolledBack(back, off, reason, again, dropped, change)

    def _after_rollback(self, done: _RolledBack) -> ServedModel:
        """Outside every lock: what follows a rollback (log, event, drops), then its change hook,
        delivered whatever failed before."""
        try:
            log.warning("rolled back to %s from %s: %s%s", done.back.describe(), done.off.describe(), done.reason,
                        " (on probation again)" if done.again else "")
            self._on_event("rollback")
            self._drop_later(done.dropped)
        finally:
            self._changes.deliver(done.change)
        return done.back

    # -- verification before the swap ------------------------------------------------------

    def verify(self, new: ServedModel) -> None:
        """ModelError unless ``new`` passes its verification beside the served model
        (``server.verification.verify_before_swap``)."""
        verify_before_swap(new, self.current, self.limits.max_changed, self.limits.max_latency_ratio,
                           self.limits.latency_slack_ms)

    # -- probation -------------------------------------------------------------------------

    def observe(self, ok: bool, model: Any, seconds: float) -> None:
        """Scheduler callback after every batch; rolls back a model failing its probation
        (``server.probation``), within the same hold of the lock as the judgement."""
        drops: list[ServedModel] = []
        done: _RolledBack | ServedModel | None = None
        with self._lock:
            if model is not self._current:
                return
            now = time.monotonic()
            reason = self._probation.record(ok, seconds, now)
            if reason is not None:
                try:
                    done = self._rollback_locked(reason, expect=model)
                except ModelError as exc:  # nothing to roll back to: it goes on serving, said loudly
                    log.error("%s failed its probation (%s) but cannot be rolled back: %s",
                              model.describe(), reason, exc)
            elif self._left is not None or self._rolled_off is not None:  # kept by a probation: let go once it ended
                drops = self._unheld(self._expire_left(now))
        try:
            if drops:
                self._drop_later(drops)
        finally:  # the rollback's change is delivered whatever failed
            if isinstance(done, _RolledBack):
                self._after_rollback(done)

    def status(self) -> dict[str, Any]:
        with self._lock:
            cur, prev = self._current, self._previous
            return {"version": cur.version, "variant": cur.variant.name, "manifest_path": cur.manifest_path,
                    "previous_version": prev.version if prev else "",
                    "previous_variant": prev.variant.name if prev else "",
                    "state": self.state, "message": self.message, "swaps": self.swaps, "rollbacks": self.rollbacks}

    def deactivate_all(self) -> None:
        """Free every model kept; closes the host first, so no swap completes after. Each is
        retired: freed now, or by a run still on it (the scheduler's stop timed out) when it
        ends. The models are taken under the lock: a health recovery's engine given after is
        freed by it. Models dropped earlier are freed by their own leases, as ever."""
        with self._lock:
            self._closed = self._freed = True
            kept = [m for m in (self._current, self._previous, self._left) if m is not None]
        for m in kept:
            m.uses.retire()
