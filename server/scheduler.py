"""Cross-camera dynamic batching in front of ``workers`` inference worker threads.

Every camera of every stream has its own bounded queue in which the latest frame wins: when
it is full, the oldest queued frame is answered ``stale`` (never silently lost). A worker
thread takes frames round robin across queues into a batch of up to ``max_batch``, waiting at
most ``max_wait`` after the oldest queued frame arrived for the batch to fill; it stops
waiting early once every known queue has contributed. Frames whose deadline passed are
answered ``expired``. Past ``max_pending`` queued frames in total, ``submit`` raises
OverloadedError instead of letting latency grow without bound.

Up to ``workers`` batches run at once, each on its own thread (on a CPU, one onnxruntime
session of one intra-op thread per core served more frames than one session spreading each
batch over every core: ``bench/bench_workers.py``). Answers still leave each stream in arrival
order (the stream's outbox orders them), whichever batch finishes first.

``run_if_idle`` is the fast path of a frame that finds the engine idle (nothing queued, a
worker free): it runs as a batch of one on the caller's thread, saving the two thread
hand-offs to the worker and back; it counts as one of the ``workers`` batches.

Answers leave through each job's ``on_done`` callback, called on the thread that ran its batch
(or on the submitting thread for a stale drop) and never under the scheduler's lock. A queue left empty
for ``quiet_s`` is forgotten (a camera that went quiet no longer makes batches wait for it, and
a client inventing camera ids cannot grow the table); its next frame makes it anew. Every
batch's outcome is reported to ``on_batch`` (health follows the engine).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from numpy.typing import NDArray

from perception.errors import NotReadyError, OverloadedError, PerceptionError
from perception.pipeline import frame_outputs
from server.metrics_protocol import NULL_METRICS, Metrics

log = logging.getLogger(__name__)


class JobStatus(Enum):
    """What became of a queued frame."""

    OK = "ok"
    STALE = "stale"  # a newer frame of the same camera took its place
    EXPIRED = "expired"  # its deadline passed while it was queued
    ERROR = "error"  # inference of its batch failed
    CANCELLED = "cancelled"  # its stream ended first
    SHED = "shed"  # dropped under overload to make room for a higher-priority camera


@dataclass
class JobResult:
    """What became of a job. ``outputs``: the frame's model outputs by name (batch axis taken
    off) when ok."""

    status: JobStatus
    outputs: dict[str, NDArray[Any]] | None = None
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_size: int = 0
    message: str = ""


@dataclass(eq=False)
class Job:
    """One frame waiting for inference. ``tensor``: what ``to_batch`` takes, e.g. (3, H, W)
    float32 model input or an (H, W, 3) uint8 canvas."""

    key: Hashable  # the queue it belongs to, e.g. (session id, camera id)
    tensor: NDArray[Any] | None
    on_done: Callable[[JobResult], None]
    deadline: float | None = None  # time.monotonic() after which the frame is expired
    enqueued: float = field(default_factory=time.monotonic)
    # The model the frame was prepared for (an object with infer / to_batch / max_batch); None =
    # the scheduler's own infer. A batch only ever holds frames of one model: after a hot swap,
    # frames prepared for the old model are still inferred by it.
    model: Any = None
    priority: int = 0  # higher is served first and shed last


class Scheduler:
    """Batches jobs from many queues into calls of ``infer`` on ``workers`` worker threads.

    infer: (B, 3, H, W) float32 -> every model output (B, ...) by name, B <= max_batch.
    to_batch: the queued items of a batch -> infer's input (default: np.stack of float tensors;
    the server queues uint8 canvases and normalises here, on the inference worker).
    metrics: where batch sizes, stage times and the queue depth are recorded.
    workers: how many batches may run at once (``infer`` must then be safe to call from that
    many threads at once, as an onnxruntime session is).
    """

    def __init__(
        self,
        infer: Callable[[NDArray[np.float32]], Mapping[str, NDArray[Any]]],
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        max_pending: int,
        metrics: Metrics = NULL_METRICS,
        to_batch: Callable[[list[Any]], NDArray[np.float32]] | None = None,
        quiet_s: float = 2.0,
        on_batch: Callable[[bool, Any, float], None] | None = None,
        workers: int = 1,
    ) -> None:
        if max_batch < 1 or queue_size < 1 or max_pending < 1 or max_wait_s < 0 or workers < 1:
            raise ValueError("max_batch, queue_size, max_pending, workers must be >= 1 and max_wait_s >= 0")
        self.workers = workers
        self._infer = infer
        self._to_batch = to_batch or (lambda items: np.stack(items))
        self.max_batch = max_batch
        self._max_wait = max_wait_s
        self.queue_size = queue_size
        self._max_pending = max_pending
        self._metrics = metrics
        self._cond = threading.Condition()
        self._queues: dict[Hashable, deque[Job]] = {}  # insertion order = round-robin order
        self._last_active: dict[Hashable, float] = {}  # queue -> when it last held a frame
        self._quiet_s = quiet_s
        self._on_batch = on_batch
        self.starvation_s = 0.5
        self.shed_for_priority = 0  # frames of lower classes shed to make room for higher ones
        self._transient: set[Hashable] = set()  # queues removed once empty (unary calls)
        self._pending = 0
        self._running = 0  # batches running (on the workers, or inline on a caller's thread)
        self._rr = 0
        self._stopping = False
        self._accepting = False
        self._threads: list[threading.Thread] = []

    # -- producers -------------------------------------------------------------------------

    def check_room(self, frames: int = 1, priority: int = 1, key: Hashable | None = None,
                   priorities: Sequence[int] = ()) -> None:
        """OverloadedError, as ``submit`` would raise it, if ``frames`` more frames of ``priority``
        would be refused now: checked before they are decoded, so that a server over capacity
        refuses them before it spends a decode on each (a KServe request of 8 frames decoded all
        8 first). No reservation: ``submit`` decides. ``key``: the queue a single frame would
        join; a full one makes room by dropping its own oldest frame, so it always has room.
        ``priorities``: the classes of several frames submitted in this order, each in a queue of
        its own, all or none (a KServe request): instead of ``frames`` and ``priority``."""
        classes = list(priorities) or [priority] * frames
        with self._cond:
            if key is not None and len(self._queues.get(key, ())) >= self.queue_size:
                return
            room = self._max_pending - self._pending
            if len(classes) <= room:
                return
            # As submit would go: the first frames take the room left, and each later one sheds
            # the oldest queued frame of the lowest class below its own, maybe one of the
            # request's own (which fails the request as surely as a refusal).
            heads = [deque((job.priority, job.enqueued, False) for job in q) for q in self._queues.values() if q]
            now = time.monotonic()
            for i, cls in enumerate(classes):
                if i < room:
                    heads.append(deque([(cls, now + i * 1e-9, True)]))
                    continue
                lower = [q for q in heads if q and q[0][0] < cls]
                if not lower:
                    break
                victim = min(lower, key=lambda q: q[0][:2])
                if victim[0][2]:
                    break
                victim.popleft()
                heads.append(deque([(cls, now + i * 1e-9, True)]))
            else:
                return
            raise OverloadedError(f"server over capacity: {self._pending} frames queued "
                                  f"(max_pending {self._max_pending})")

    def submit(self, job: Job, transient: bool = False) -> None:
        """Queue ``job``. Raises OverloadedError when over capacity, NotReadyError when stopped.

        If the job's queue is full, its oldest job is answered ``stale`` (on this thread).
        """
        stale: Job | None = None
        with self._cond:
            if not self._accepting:
                raise NotReadyError("the server is not accepting frames (starting or shutting down)")
            q = self._queues.get(job.key)
            if q is None:
                q = self._queues[job.key] = deque()
                if transient:
                    self._transient.add(job.key)
            shed: Job | None = None
            if len(q) >= self.queue_size:
                stale = q.popleft()
                self._pending -= 1
            elif self._pending >= self._max_pending:
                # Over capacity: make room by shedding a queued frame of a lower priority class
                # (the oldest of the lowest), else refuse this one.
                shed = self._shed_below_locked(job.priority)
                if shed is None:
                    if not q:
                        self._forget_locked(job.key)
                    raise OverloadedError(
                        f"server over capacity: {self._pending} frames queued (max_pending {self._max_pending})"
                    )
            q.append(job)
            self._last_active[job.key] = job.enqueued
            self._pending += 1
            self._gauge_locked()
            self._cond.notify_all()
        if stale is not None:
            stale.tensor = None
            _call(stale, JobResult(JobStatus.STALE, queue_s=time.monotonic() - stale.enqueued,
                                   message="a newer frame of this camera arrived first"))
        if shed is not None:
            shed.tensor = None
            self.shed_for_priority += 1
            _call(shed, JobResult(JobStatus.SHED, queue_s=time.monotonic() - shed.enqueued,
                                  message="shed under overload for a higher-priority camera"))

    def _shed_below_locked(self, priority: int) -> Job | None:
        victim_key, victim = None, None
        for key, q in self._queues.items():
            if q and q[0].priority < priority and (
                    victim is None or (q[0].priority, q[0].enqueued) < (victim.priority, victim.enqueued)):
                victim_key, victim = key, q[0]
        if victim is None:
            return None
        self._queues[victim_key].popleft()
        self._pending -= 1
        return victim

    def open(self, key: Hashable) -> None:
        """Make queue ``key`` known before its first frame, so batches wait for it (a stream
        that has announced its camera)."""
        with self._cond:
            self._queues.setdefault(key, deque())
            self._last_active.setdefault(key, time.monotonic())

    def close(self, key: Hashable) -> int:
        """Forget queue ``key`` (its stream ended or was cancelled); queued jobs are answered
        ``cancelled`` and their memory released. Returns how many were dropped."""
        with self._cond:
            q = self._queues.pop(key, None)
            self._transient.discard(key)
            self._last_active.pop(key, None)
            dropped = list(q or ())
            self._pending -= len(dropped)
            self._gauge_locked()
        for job in dropped:
            job.tensor = None
            _call(job, JobResult(JobStatus.CANCELLED, message="stream closed"))
        return len(dropped)

    @property
    def pending(self) -> int:
        """Frames queued (not yet taken into a batch), across all queues."""
        with self._cond:
            return self._pending

    @property
    def queue_count(self) -> int:
        """Queues currently known (one per open stream camera, plus waiting unary calls)."""
        with self._cond:
            return len(self._queues)

    # -- life cycle ------------------------------------------------------------------------

    def run_if_idle(self, job: Job, transient: bool = False) -> bool:
        """Run ``job`` now, on this thread, if the engine can take it at once: a worker free,
        nothing queued, and, when batches may hold several frames, no other camera known (a
        known camera is one the batcher would wait up to ``max_wait`` for, to batch with it).
        False (nothing done) otherwise: ``submit`` it. True also for a job already past its
        deadline: it is answered ``expired`` instead of run, as a queued one would be.
        A job that is not ``transient`` makes its camera known, as ``submit`` does.
        NotReadyError when not accepting."""
        with self._cond:
            if not self._accepting:
                raise NotReadyError("the server is not accepting frames (starting or shutting down)")
            if self._running >= self.workers or self._pending or self._stopping:
                return False
            now = time.monotonic()
            self._forget_quiet_locked(now)  # as the worker does after each batch
            # Another known camera is one a batch of several would wait for; runs of one frame
            # (a CPU's default) wait for nobody, so it does not keep this frame off the fast path.
            if self.max_batch > 1 and any(key != job.key for key in self._queues):
                return False
            if not transient:
                self._queues.setdefault(job.key, deque())
                self._last_active[job.key] = now
            # Past its deadline already (its decode took that long): inferring it would spend
            # the engine on an answer that is late whatever it says.
            expired = job.deadline is not None and now > job.deadline
            if not expired:
                self._running += 1
        if expired:
            _expire(job, now)
            return True
        try:
            self._run_batch([job])
        finally:
            with self._cond:
                self._running -= 1
                self._capacity_freed_locked()
        return True

    def start(self) -> None:
        with self._cond:
            if self._threads:
                return
            self._accepting = True
            self._stopping = False
            self._threads = [threading.Thread(target=self._run, name=f"inference-worker-{k}", daemon=True)
                             for k in range(self.workers)]
            for thread in self._threads:
                thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; answer every queued frame (drain), then end the worker."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
            threads = list(self._threads)
        end = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))
            if thread.is_alive():
                log.warning("inference worker did not finish within %.1f s", timeout or 0.0)
        with self._cond:
            self._threads = []

    # -- the worker ------------------------------------------------------------------------

    def _run(self) -> None:
        # A bug in the batcher's own bookkeeping must not end the worker: a dead worker leaves
        # the server SERVING while its frames wait for their deadlines (CI once lost one so).
        while True:
            try:
                self._serve()
                return
            except Exception:
                log.exception("inference worker %s: unexpected error in the batcher; it goes on",
                              threading.current_thread().name)
                time.sleep(0.01)  # a bug that repeats does not spin a core

    def _serve(self) -> None:
        while True:
            with self._cond:
                while (self._pending == 0 or self._running >= self.workers) and not self._stopping:
                    self._cond.wait()
                if self._pending == 0 and self._stopping:
                    while self._running:  # every other batch (inline ones too) finishes first
                        self._cond.wait()
                    return
                self._wait_for_batch_locked()
                if self._running >= self.workers and not self._stopping:
                    continue  # the other worker or an inline run took the capacity while this one waited
                now = time.monotonic()
                self._forget_quiet_locked(now)  # before the take: a bug in it loses no frame
                jobs, expired = self._take_batch_locked(now)
                self._gauge_locked()
                self._running += bool(jobs)
            try:
                now = time.monotonic()
                for job in expired:
                    _expire(job, now)
                if jobs:
                    self._run_batch(jobs)
            finally:
                if jobs:
                    with self._cond:
                        self._running -= 1
                        self._capacity_freed_locked()

    def _capacity_freed_locked(self) -> None:
        """A run ended. Only a worker with frames to take (or a stop draining the runs) waits for
        that; with nothing queued, every idle worker would wake, find nothing and sleep again.
        Each fast-path frame woke both idle workers so, and they took the interpreter from the
        thread answering it."""
        if self._pending or self._stopping:
            self._cond.notify_all()

    def _wait_for_batch_locked(self) -> None:
        while not self._stopping:
            heads = [q[0] for q in self._queues.values() if q]
            target = min(self.max_batch, len(self._queues))
            # No heads: the frames this worker waited for went while it slept (the other worker
            # took them, or their stream closed); the caller takes an empty batch and waits again.
            if not heads or len(heads) >= target or self._pending >= self.max_batch:
                return
            remaining = min(j.enqueued for j in heads) + self._max_wait - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _take_batch_locked(self, now: float) -> tuple[list[Job], list[Job]]:
        """Round robin: one frame per queue per round, starting after last batch's start."""
        jobs: list[Job] = []
        expired: list[Job] = []
        keys = list(self._queues)
        if not keys:
            return jobs, expired
        start = self._rr % len(keys)
        order = keys[start:] + keys[:start]
        self._rr = start + 1
        # Higher priorities first (a stable sort keeps the round robin within a priority). A frame
        # waiting longer than starvation_s climbs one class per starvation_s, so a lower class is
        # delayed, never starved without bound.
        def rank(k: Hashable) -> float:
            q = self._queues.get(k)
            if not q:
                return 0.0
            return -(q[0].priority + (now - q[0].enqueued) / self.starvation_s)

        order.sort(key=rank)
        progress = True
        model: Any = _UNSET
        limit = self.max_batch
        while len(jobs) < limit and progress:
            progress = False
            for key in order:
                q = self._queues.get(key)
                if not q:
                    continue
                if model is not _UNSET and q[0].model is not model:
                    continue  # another model's frame: the next batch
                # A critical camera's whole queue goes into the batch, not one frame per round:
                # otherwise it gets one frame per batch, however many cameras share the batch.
                take = len(q) if q[0].priority >= CRITICAL else 1
                for _ in range(take):
                    if not q or (model is not _UNSET and q[0].model is not model):
                        break
                    job = q.popleft()
                    self._pending -= 1
                    progress = True
                    if job.deadline is not None and now > job.deadline:
                        expired.append(job)
                        continue
                    if model is _UNSET:
                        model = job.model
                        limit = min(self.max_batch, getattr(model, "max_batch", self.max_batch))
                    jobs.append(job)
                    if len(jobs) >= limit:
                        break
                if len(jobs) >= limit:
                    break
        for key in order:
            if key in self._transient and not self._queues.get(key):
                self._forget_locked(key)
        return jobs, expired

    def _forget_locked(self, key: Hashable) -> None:
        self._queues.pop(key, None)
        self._transient.discard(key)
        self._last_active.pop(key, None)

    def _forget_quiet_locked(self, now: float) -> None:
        quiet = [k for k, q in self._queues.items()
                 if not q and now - self._last_active.get(k, now) > self._quiet_s]
        for k in quiet:
            self._forget_locked(k)

    def _run_batch(self, jobs: list[Job]) -> None:
        start = time.monotonic()
        model = jobs[0].model
        infer = self._infer if model is None else model.infer
        to_batch = self._to_batch if model is None else model.to_batch
        one_frame = frame_outputs if model is None else model.frame_outputs  # a model's checks each frame
        try:
            batch = to_batch([j.tensor for j in jobs])
            out = infer(batch)
            error = ""
        except PerceptionError as exc:
            # The frames' answers carry an id to quote; the engine's own text stays in the log.
            error = f"error id {uuid.uuid4().hex[:12]}"
            log.error("inference of a batch of %d failed (%s): %s", len(jobs), error, exc)
            out = None
        except Exception:  # a runtime bug must answer the frames, not kill the worker
            error = f"error id {uuid.uuid4().hex[:12]}"
            log.exception("inference of a batch of %d failed (%s)", len(jobs), error)
            out = None
        end = time.monotonic()
        infer_s = end - start
        try:
            self._metrics.observe_batch(len(jobs))
            self._metrics.observe_stage("inference", infer_s)
        except Exception:  # nor must metrics
            log.exception("recording a batch's metrics failed")
        results: list[JobResult] = []
        for i, job in enumerate(jobs):
            job.tensor = None
            queue_s = start - job.enqueued
            outputs = None
            if out is not None:
                try:
                    outputs = one_frame(out, i)
                except PerceptionError as exc:  # e.g. its outputs are all NaN: this frame fails, not the batch
                    error = f"error id {uuid.uuid4().hex[:12]}"
                    log.error("the output of frame %d of a batch of %d is unusable (%s): %s", i, len(jobs), error, exc)
                except Exception:  # e.g. an output without the batch's axis: every frame is still answered
                    error = f"error id {uuid.uuid4().hex[:12]}"
                    log.exception("the output of frame %d of a batch of %d is unusable (%s)", i, len(jobs), error)
            if outputs is None:
                results.append(JobResult(JobStatus.ERROR, None, queue_s, infer_s, len(jobs),
                                         f"inference failed ({error})"))
            else:
                results.append(JobResult(JobStatus.OK, outputs, queue_s, infer_s, len(jobs)))
            try:
                self._metrics.observe_stage("queue", queue_s)
            except Exception:
                log.exception("recording a frame's queue time failed")
        stats = getattr(model, "stats", None)  # a ServedModel's (server.model_stats)
        if stats is not None and out is not None:
            try:
                stats.executed(len(jobs), infer_s)
            except Exception:  # nor must statistics
                log.exception("recording a batch's statistics failed")
        if self._on_batch is not None:  # failed if any frame's output was unusable: health and probation see it
            try:
                self._on_batch(all(r.status is JobStatus.OK for r in results), model, infer_s)
            except Exception:  # health bookkeeping must not take the worker down
                log.exception("batch outcome callback failed")
        for job, result in zip(jobs, results, strict=True):
            _call(job, result)

    def _gauge_locked(self) -> None:
        """Set the queue-depth gauge; called with ``_cond`` held, so that the gauge is written in
        the order the depth changed (written after the lock was let go, an older depth could land
        last and stay there once traffic stops). A gauge's set takes only prometheus' own lock."""
        try:
            self._metrics.set_queue_depth(self._pending)
        except Exception:  # a metrics error must not cost the frames being queued or taken
            log.exception("updating the queue depth failed")


_UNSET = object()
CRITICAL = 2  # the priority of the critical class (server.config.PRIORITY_CLASSES)


def _expire(job: Job, now: float) -> None:
    job.tensor = None
    _call(job, JobResult(JobStatus.EXPIRED, queue_s=now - job.enqueued,
                         message="deadline passed before the frame was inferred"))


def _call(job: Job, result: JobResult) -> None:
    try:
        job.on_done(result)
    except Exception:  # a broken callback must not take the worker down
        log.exception("answer callback failed")
