"""Probation: a model swapped in is judged on the traffic it serves, for ``probation_s``.

Verification before a swap judges a new model on the few frames its artifact ships; probation
judges it on every batch it runs once it serves. A model whose batches fail too often, or whose
latency crosses a limit (set by the batches of the model served before it, or fixed by
``max_p99_ms``), fails its probation, and the host (``server.model_host``) rolls it back.

The error rate is judged at every batch; the latency (a sort of up to 10,000 batch times, under
the host's lock) at every batch of the first 100 and every 16th after. The p99 limit scales with
how much slower than its fallback the new model's build measured it (a recover step up to a
slower variant is expected to be slower), as verification does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from server.served_model import ServedModel, recorded_latency_ratio


@dataclass(frozen=True, kw_only=True)
class ProbationLimits:
    """How a model swapped in is judged on the traffic it serves."""

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


class Probation:
    """The batches of the served model: outside a window, the baseline the next model on
    probation is judged against; within one, that model's record. Not thread-safe: its owner
    calls it under a lock of its own."""

    def __init__(self, limits: ProbationLimits) -> None:
        self.limits = limits
        self.until = 0.0  # when the window ends (time.monotonic()); 0: no window
        self._n = 0  # batches of the model on probation
        self._errors = 0
        self._ok_s: deque[float] = deque(maxlen=10_000)  # seconds of its successful batches
        self._recent: deque[float] = deque(maxlen=500)  # batch seconds of the served model, outside probation
        self._baseline_p99_s = 0.0
        self._latency_allowance = 1.0  # how much slower than the previous model its build measured it

    def on(self, now: float) -> bool:
        """Whether the served model is on probation at ``now``."""
        return now < self.until

    def measure_baseline(self, keep: bool = False) -> None:
        """Judge the next window's latency against the p99 of the served model's batches outside
        probation. With none counted, no latency is judged against a baseline (a fixed
        ``max_p99_ms`` still is); or, with ``keep``, the baseline measured before still is (a
        model put on probation again was judged against it)."""
        if self._recent:
            self._baseline_p99_s = float(np.percentile(self._recent, 99))
        elif not keep:
            self._baseline_p99_s = 0.0

    def start(self, now: float, model: ServedModel, fallback: ServedModel | None) -> None:
        """Put ``model`` on probation from ``now``: its p99 limit is scaled by how much slower
        than ``fallback`` (what its rollback would serve) its build measured it."""
        self._latency_allowance = (max(1.0, recorded_latency_ratio(model, fallback))
                                   if fallback is not None else 1.0)
        self.end()
        self.until = now + self.limits.probation_s

    def end(self) -> None:
        """End the window, if one is open, and forget every batch counted: the next batches are
        another model's."""
        self.until = 0.0
        self._n = self._errors = 0
        self._ok_s.clear()
        self._recent.clear()

    def record(self, ok: bool, seconds: float, now: float) -> str | None:
        """Count a batch of the served model: why it fails its probation, or None (it does not,
        is not judged yet, or is not on probation)."""
        if not self.on(now):
            if ok:
                self._recent.append(seconds)
            return None
        return self._failure(self._count(ok, seconds))

    def _failure(self, judged: tuple[float, float, float, float] | None) -> str | None:
        if judged is None:
            return None
        errors, p50, p99, limit_p99 = judged
        if errors > self.limits.max_error_rate:
            return f"{errors:.0%} of its batches failed in probation (limit {self.limits.max_error_rate:.0%})"
        if limit_p99 > 0 and p50 > limit_p99:
            return (f"its inference median {1e3 * p50:.1f} ms crossed the p99 limit {1e3 * limit_p99:.1f} ms "
                    "in probation")
        if limit_p99 > 0 and p99 > limit_p99:
            return f"its inference p99 {1e3 * p99:.1f} ms crossed {1e3 * limit_p99:.1f} ms in probation"
        return None

    def _count(self, ok: bool, seconds: float) -> tuple[float, float, float, float] | None:
        """Count a batch of the model on probation; (error rate, p50, p99, p99 limit) once there
        are enough batches to judge, else None. A latency not judged at this batch is 0."""
        self._n += 1
        if ok:
            self._ok_s.append(seconds)
        else:
            self._errors += 1
        n = self._n
        if n < self.limits.probation_min_batches:
            return None
        errors = self._errors / n
        p50 = p99 = limit_p99 = 0.0
        if n <= 100 or n % 16 == 0:
            ok_s = np.fromiter(self._ok_s, np.float64, len(self._ok_s))
            p99 = float(np.percentile(ok_s, 99)) if ok_s.size >= self.limits.probation_min_latency_batches else 0.0
            p50 = float(np.median(ok_s)) if ok_s.size >= self.limits.probation_min_batches else 0.0
            base = self._baseline_p99_s * self._latency_allowance
            limit_p99 = (self.limits.max_p99_ms / 1e3 if self.limits.max_p99_ms
                         else max(2.0 * base, base + self.limits.p99_slack_ms / 1e3) if base > 0 else 0.0)
        return errors, p50, p99, limit_p99
