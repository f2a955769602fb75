"""Graceful degradation: under sustained load (or heat), serve a faster gated variant of the same
manifest; go back up, with hysteresis, when the load falls.

The server watches its own queueing through the answers it gives (``LoadMonitor``): the share
of frames shed (stale, expired, overloaded) and the OK frames' end-to-end p99, over a sliding
window. ``Degrader`` moves down the manifest's variants that passed their gate, ordered by the
latency their build measured, when ``down_windows`` windows in a row are overloaded (as many
rungs at once as the shed share asks for, given the inference's share of the per-frame work:
``_down_to``), and back up one rung after
``up_windows`` calm ones. A thermal or power signal (a file holding a number, such as a
thermal zone's millidegrees) counts as overload while it is at or above its limit. Each move is
a hot swap through the ``ModelHost`` (so the same checks apply), logged, counted as a metric,
and visible in every answer's model_variant.

The degrader's state is written by two threads: its own (each window's ``step``) and whichever
thread delivers the host's change hook (``model_changed``: an admin handler's load or rollback,
probation's rollback on an inference thread, or the degrader's own move). A lock makes each
transition whole; it is never held across a swap, which returns only once its change hook ran,
maybe on another thread waiting for that lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from perception.errors import ManifestError, ModelError
from perception.manifest import Variant, VariantFormat
from server.metrics_protocol import Metrics
from server.model_host import STEP_CAUSES, ModelHost
from server.served_model import ServedModel

log = logging.getLogger(__name__)


class Window(NamedTuple):
    frames: int  # answered OK or shed
    shed: float  # share of frames shed
    p99_s: float  # OK frames' end-to-end p99
    # Inference's share of the measured work per frame: inference time per frame inferred over
    # that plus pre-processing time per frame (1.0 when either is unknown).
    inference_share: float


class LoadMonitor:
    """Frame outcomes of the last window: answered, shed, and OK end-to-end latencies; and the
    time spent per frame pre-processing and in inference."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ok = 0
        self._shed = 0
        self._lat: deque[float] = deque(maxlen=20_000)
        self._pre_s = self._inf_s = 0.0  # pre-processing and inference seconds
        self._pre_n = self._inf_n = 0  # frames pre-processed; frames in the batches inferred

    def answered(self) -> None:
        with self._lock:
            self._ok += 1

    def dropped(self, reason: str) -> None:
        if reason in ("stale", "expired", "overloaded"):
            with self._lock:
                self._shed += 1

    def latency(self, seconds: float) -> None:
        with self._lock:
            self._lat.append(seconds)

    def work(self, stage: str, seconds: float) -> None:
        """A frame's pre-processing time, or a batch's inference time."""
        if stage == "preprocess":
            with self._lock:
                self._pre_s += seconds
                self._pre_n += 1
        elif stage == "inference":
            with self._lock:
                self._inf_s += seconds

    def batch(self, size: int) -> None:
        with self._lock:
            self._inf_n += size

    def take(self) -> Window:
        """The window since the last call; resets it."""
        with self._lock:
            ok, shed, lat = self._ok, self._shed, list(self._lat)
            pre_s, pre_n, inf_s, inf_n = self._pre_s, self._pre_n, self._inf_s, self._inf_n
            self._ok = self._shed = self._pre_n = self._inf_n = 0
            self._pre_s = self._inf_s = 0.0
            self._lat.clear()
        n = ok + shed
        share = 1.0
        if pre_n and inf_n and inf_s > 0:
            share = (inf_s / inf_n) / (pre_s / pre_n + inf_s / inf_n)
        return Window(n, shed / n if n else 0.0, float(np.percentile(lat, 99)) if lat else 0.0, share)


class MonitoredMetrics:
    """The server's metrics, also telling a LoadMonitor what became of every frame."""

    def __init__(self, inner: Metrics, monitor: LoadMonitor) -> None:
        self._inner = inner
        self._monitor = monitor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def frame_answered(self, camera_id: str) -> None:
        self._monitor.answered()
        self._inner.frame_answered(camera_id)

    def frame_dropped(self, camera_id: str, reason: str) -> None:
        self._monitor.dropped(reason)
        self._inner.frame_dropped(camera_id, reason)

    def observe_stage(self, stage: str, seconds: float) -> None:
        if stage == "end_to_end":
            self._monitor.latency(seconds)
        else:
            self._monitor.work(stage, seconds)
        self._inner.observe_stage(stage, seconds)

    def observe_batch(self, size: int) -> None:
        self._monitor.batch(size)
        self._inner.observe_batch(size)


@dataclass(frozen=True)
class DegradePolicy:
    window_s: float = 2.0
    shed_high: float = 0.05  # a window shedding more than this share of frames is overloaded
    shed_low: float = 0.01  # ... and one shedding less than this (with a p99 in budget) is calm
    p99_budget_ms: float = 0.0  # 0 = judge by shedding alone
    down_windows: int = 2
    up_windows: int = 5
    min_frames: int = 10  # windows with fewer frames are calm if they shed nothing, else say nothing (streaks kept)
    thermal_path: str = ""  # a file holding a number (e.g. /sys/class/thermal/thermal_zone0/temp)
    thermal_limit: float = 0.0  # at or above: overloaded
    # After a move is refused (its variant failed verification, or the artifact on disk changed),
    # no move for this long, doubling at each refusal up to retry_max_s: a load, warm-up and
    # verification every window would load a CPU already overloaded. Not measured: a policy.
    retry_s: float = 30.0
    retry_max_s: float = 600.0


def ladder(model: ServedModel) -> list[Variant]:
    """The gated ONNX variants of ``model``'s manifest, slowest (most accurate) first, with the
    served variant and the operator's on it whatever their gate or format. The operator's variant
    was left off when it was not a gated ONNX variant with a measured latency (one named although
    it failed its gate, a TensorRT engine): after the first degrade, recovery then climbed to the
    slowest variant of all, past the one the operator chose."""
    ok = [v for v in model.manifest.variants
          if v.passed and v.format is VariantFormat.ONNX and v.latency_ms.get("p50")]
    for v in (model.variant, *(v for v in model.manifest.variants if v.name == model.operator_variant)):
        if v not in ok:
            ok.append(v)
    return sorted(ok, key=lambda v: -v.latency_ms.get("p50", 0.0))


def _down_to(rungs: list[Variant], here: int, shed: float, inference_share: float = 1.0) -> int:
    """The rung to degrade to: the slowest one below ``here`` whose build-measured latency is at
    most ``1 - shed / inference_share`` times the current one's, else the fastest.

    To serve what was shed, the work per frame has to fall by the shed share; a faster variant
    cuts only the inference's part of it (on a CPU, decoding shares the cores with inference),
    so inference has to fall by shed / inference_share. With inference taking all of the work
    that is (1 - shed); at 8 cameras x 30 fps here inference was 0.53-0.57 of it, and asking for
    (1 - shed) took two moves, 8 s, from fp32 to pruned_int8 (one rung at a time: four moves,
    17 s) in a 30 s overload (bench/bench_lifecycle.py), shedding all along."""
    share = min(max(inference_share, 1e-6), 1.0)
    want = rungs[here].latency_ms.get("p50", 0.0) * max(0.0, 1.0 - min(max(shed, 0.0), 1.0) / share)
    for i in range(here + 1, len(rungs)):
        if rungs[i].latency_ms.get("p50", 0.0) <= want:
            return i
    return len(rungs) - 1


class Degrader:
    """Moves the served variant down and up the ladder from the load it sees."""

    def __init__(self, host: ModelHost, monitor: LoadMonitor, policy: DegradePolicy, metrics: Metrics) -> None:
        self.host = host
        self.monitor = monitor
        self.policy = policy
        self.metrics = metrics
        # Guards the state below. Held for reads and writes of it only: never across a swap, nor
        # a read of the thermal file (the hook waiting for it may be on an inference thread).
        self._lock = threading.Lock()
        self.moves: deque[tuple[float, str, str]] = deque(maxlen=1000)  # (time, direction, variant)
        self.refused = 0
        self._hot = self._calm = 0
        self._retry_at = 0.0
        self._retry_s = policy.retry_s
        # A recover that the load undid (a degrade within a few windows of it): no recover before
        # _recover_at, the wait doubling at each such one (retry_s up to retry_max_s). Without it a
        # load the lighter rung keeps up with and the heavier does not moved down and up for ever,
        # every up_windows + down_windows windows, each move a load, warm-up and verification.
        self._recovered_at: float | None = None  # when the last recover moved, until it held
        self._recover_at = 0.0
        self._recover_wait_s = policy.retry_s
        self._moved: ServedModel | None = None  # the model of the last move, until it passed probation
        # The model the last change hook reported: until the hook of a change has run, the
        # windows counted are the model's before it.
        self._seen = host.current
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="degrader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _thermal_hot(self) -> bool:
        p = self.policy
        if not p.thermal_path:
            return False
        try:
            return float(Path(p.thermal_path).read_text().split()[0]) >= p.thermal_limit
        except (OSError, ValueError, IndexError):
            log.warning("cannot read the thermal signal %s", p.thermal_path)
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.policy.window_s):
            try:
                self.step()
            except Exception:  # a failed move is logged; the served model goes on
                log.exception("degradation step failed")

    def model_changed(self, model: ServedModel, cause: str) -> None:
        """The host serves ``model`` (its on_change hook). After an operator's load or any
        rollback the windows counted so far were another model's: they start again. A probation
        rollback of one of the degrader's own moves backs off as a refusal does: the move failed
        on this device, and the next overloaded windows would make it again, and again (a move
        and its rollback every few windows). The degraded gauge follows whatever changed the
        model (a rollback too).

        The hooks of the host's changes are delivered one at a time, in order, so the gauge is
        left as the last change set it.

        The outcomes counted until now were the model before's, while the change loaded,
        warmed up and verified this one: they are let go, so that the next window is this
        model's. They used to make it: a degrade under load judged its new rung on the frames
        the old one shed while it loaded, and was one overloaded window from the next."""
        self.monitor.take()
        with self._lock:
            self._seen = model
            if cause == "load":
                self._hot = self._calm = 0
                self._retry_at, self._retry_s = 0.0, self.policy.retry_s
                self._recovered_at, self._recover_at, self._recover_wait_s = None, 0.0, self.policy.retry_s
            elif cause == "rollback":
                self._hot = self._calm = 0
                last = self.host.last_rollback
                if last is not None and last.back is model and last.automatic and last.off.cause in STEP_CAUSES:
                    self._back_off(f"{last.off.cause} to {last.off.variant.name} rolled back in probation")
        self.metrics.set_degraded(model.variant.name != model.operator_variant)

    def _back_off(self, why: str) -> None:
        """Under the lock: no move for the current back-off (30 s, doubling at each one up to 10
        minutes)."""
        self._retry_at = time.monotonic() + self._retry_s
        log.error("%s; no move for %.0f s", why, self._retry_s)
        self._retry_s = min(2 * self._retry_s, self.policy.retry_max_s)

    def step(self) -> str:
        """One window: '' (no move), 'degrade' or 'recover'. One thread at a time (the degrader's).

        The step is computed from the served model read once, and its move is based on that
        model: a load or rollback after the read refuses the move. The move used to read the
        served model again, and so could move an operator's newly loaded model as the windows of
        the one before it asked. A model swapped in whose change hook has not run yet (the hook
        resets the windows) is not moved either."""
        p = self.policy
        with self._lock:  # the model this window is counted for, read before the window is taken:
            seen = self._seen  # a change hook between the two discards what the window then holds
        frames, shed, p99, share = self.monitor.take()
        hot = self._thermal_hot()
        serving = self.host.state != "probation"  # the last move is through its probation
        cur = self.host.current
        with self._lock:
            if cur is not self._seen or cur is not seen:  # swapped meanwhile: this window is not its own
                return ""
            if self._moved is not None and serving:
                if cur is self._moved:  # the last move held: back-offs start again from retry_s
                    self._retry_s = p.retry_s
                self._moved = None
            now = time.monotonic()
            if now < self._retry_at:
                return ""
            rungs = ladder(cur)
            names = [v.name for v in rungs]
            here = names.index(cur.variant.name) if cur.variant.name in names else 0
            top = names.index(cur.operator_variant) if cur.operator_variant in names else 0
            if frames < p.min_frames and not hot:
                # Too few frames to judge load by: such a window says nothing (the streaks stay as
                # they are), but one that shed none of them is calm: an idle server used to stay
                # degraded (and its degraded alert firing) for good.
                if shed > 0:
                    return ""
                overloaded, calm = False, True
            else:
                over_budget = p.p99_budget_ms > 0 and p99 * 1e3 > p.p99_budget_ms
                overloaded = hot or shed > p.shed_high or over_budget
                calm = not hot and shed < p.shed_low and (p.p99_budget_ms <= 0 or self._fits_budget(p99, rungs, here))
            self._hot = self._hot + 1 if overloaded else 0
            self._calm = self._calm + 1 if calm else 0
            if self._recovered_at is not None and now - self._recovered_at > self._held_s():
                self._recovered_at, self._recover_wait_s = None, p.retry_s  # the last recover held
            if self._hot >= p.down_windows and here + 1 < len(rungs):
                to, direction = rungs[_down_to(rungs, here, shed, share)], "degrade"
                why = (f"shed {shed:.0%}, p99 {p99 * 1e3:.0f} ms, inference {share:.0%} of the work"
                       + (", thermal limit" if hot else ""))
                if self._recovered_at is not None:  # the load undid the last recover
                    self._recover_at = now + self._recover_wait_s
                    log.warning("the recover %.0f s ago did not hold; no recover for %.0f s",
                                now - self._recovered_at, self._recover_wait_s)
                    self._recover_wait_s = min(2 * self._recover_wait_s, p.retry_max_s)
                    self._recovered_at = None
            elif self._calm >= p.up_windows and here > top and now >= self._recover_at:
                to, direction, why = rungs[here - 1], "recover", f"calm for {self._calm} windows"
            else:
                return ""
            self._hot = self._calm = 0
        moved = self._move(cur, to, direction, why)
        if moved == "recover":
            with self._lock:
                self._recovered_at = time.monotonic()
        return moved

    def _held_s(self) -> float:
        """How long a recover must go without a degrade to have held: the windows a degrade
        right after it takes (down_windows), and as many again."""
        return 2 * (self.policy.down_windows + 1) * self.policy.window_s

    def _fits_budget(self, p99_s: float, rungs: list[Variant], here: int) -> bool:
        """Whether the rung above would keep the p99 budget: this window's p99 plus the inference
        time the build measured the rung above to add (p50s; the rest of a frame's time, decode
        and the wire, does not change with the variant). Half the budget, a fixed margin, was
        never met by a model whose p99 idles above half of it: it never recovered (a review's
        run: p99 30 ms against a 50 ms budget, 100 windows shedding nothing). A rung without a
        measured latency is taken to double the p99."""
        p = self.policy
        if here == 0:
            return p99_s * 1e3 < p.p99_budget_ms
        now_ms, up_ms = rungs[here].latency_ms.get("p50", 0.0), rungs[here - 1].latency_ms.get("p50", 0.0)
        extra_ms = max(up_ms - now_ms, 0.0) if now_ms > 0 and up_ms > 0 else p99_s * 1e3
        return p99_s * 1e3 + extra_ms < p.p99_budget_ms

    def _move(self, cur: ServedModel, to: Variant, direction: str, why: str) -> str:
        """Swap ``to`` in for ``cur``, outside the lock: the swap returns once its change hook
        (``model_changed``, which takes the lock) ran, maybe on another thread. The degraded
        gauge is that hook's to set: set here too, it could overwrite a later change's."""
        log.warning("%s: %s -> %s (%s)", direction, cur.variant.name, to.name, why)
        try:
            # base: refused if a rollback (or a load) serves another model by the time the
            # variant is loaded; the step was computed from this one.
            moved = self.host.load_and_swap(cur.manifest_path, to.name, cause=direction,
                                            expect_version=cur.version, base=cur)
        except (ModelError, ManifestError) as exc:
            with self._lock:
                self.refused += 1
                self._back_off(f"{direction} to {to.name} refused ({exc})")
            return ""
        with self._lock:
            self._moved = moved  # the back-off is reset once it served through its probation
            self.moves.append((time.monotonic(), direction, to.name))
        self.metrics.lifecycle_event(direction)
        return direction
