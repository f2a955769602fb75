"""Cumulative inference statistics of one served model, as Triton's ModelStatistics reports them.

A Triton user's tools read these: tritonclient's ``get_inference_statistics`` and perf_analyzer,
which prints the server's side of each measurement (queue, compute input / infer / output) from
the difference of two snapshots. The KServe front door answers ``ModelStatistics`` from them
(``server.kserve``). Prometheus has the same stages as histograms (``server.metrics``); these are
plain running sums, kept per model name and version (``stats_for``): every loaded model of one
version (its variants, which the degrader moves between; a reload; a rollback to it) adds to the
same sums, and a hot swap to another version starts that one at zero.

What is counted, in Triton's terms, per frame: a frame is a request (one Detect call, one
stream frame; a KServe request of B images counts B, where Triton counts a request of a model
without a batch dimension, as ModelConfig describes this one, once):

- ``success``: frames answered with detections, and their time in the server (arrival to answer);
- ``fail``: frames decoded for the model and not answered with detections (dropped, expired,
  failed, refused after its decode, or their call ended first), and their time in the server.
  A frame refused before its decode (undecodable, over capacity, answered stale) never reached
  the model and is not counted; the Prometheus drop counters have every frame;
- ``queue``, ``compute_input`` (decode + letterbox + normalise), ``compute_infer`` (the run of
  the batch the frame was in), ``compute_output`` (decoding the outputs + NMS): per successful
  frame;
- ``execution_count`` and the per-batch-size ``compute_infer``: per run of the engine for clients
  (not the warm-up or verification runs).
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field


@dataclass
class Duration:
    """A count and the nanoseconds summed over it."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, int(seconds * 1e9))


@dataclass
class StatsSnapshot:
    """A consistent copy of a model's statistics."""

    last_inference_ms: int = 0  # ms since the epoch of the last frame answered (0: none)
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)  # batch size -> its runs


class InferenceStats:
    """Running sums, updated by the threads that answer frames and run batches. Thread-safe;
    each update is a few additions under a lock of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._s = StatsSnapshot()

    def answered(self, ok: bool, total_s: float, queue_s: float = 0.0, input_s: float = 0.0, infer_s: float = 0.0,
                 output_s: float = 0.0) -> None:
        """A frame the model was given was answered: with detections (``ok``) or not."""
        now_ms = int(time.time() * 1000)
        with self._lock:
            s = self._s
            s.last_inference_ms = now_ms
            if not ok:
                s.fail.add(total_s)
                return
            s.inference_count += 1
            s.success.add(total_s)
            s.queue.add(queue_s)
            s.compute_input.add(input_s)
            s.compute_infer.add(infer_s)
            s.compute_output.add(output_s)

    def executed(self, batch_size: int, infer_s: float) -> None:
        """The engine ran a batch of ``batch_size`` frames for clients, in ``infer_s``."""
        with self._lock:
            self._s.execution_count += 1
            self._s.batches.setdefault(batch_size, Duration()).add(infer_s)

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            s = self._s
            copy = StatsSnapshot(s.last_inference_ms, s.inference_count, s.execution_count)
            for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                d = getattr(s, name)
                setattr(copy, name, Duration(d.count, d.ns))
            copy.batches = {size: Duration(d.count, d.ns) for size, d in s.batches.items()}
            return copy


_SHARED: weakref.WeakValueDictionary[tuple[str, str], InferenceStats] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def stats_for(name: str, version: str) -> InferenceStats:
    """The sums of model ``name`` at ``version``, shared by every loaded model of it: Triton's
    clients take rates from the difference of two snapshots of one name and version, and a
    degrade step (another variant of the version), a reload of the version or a rollback to it
    must not set them back (perf_analyzer subtracts unsigned: a drop wraps). Kept while a model
    of that version is loaded; one loaded again after that starts at zero, as Triton's does."""
    with _SHARED_LOCK:
        stats = _SHARED.get((name, version))
        if stats is None:
            stats = _SHARED[(name, version)] = InferenceStats()
        return stats


__all__ = ["Duration", "InferenceStats", "StatsSnapshot", "stats_for"]
