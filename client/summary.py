"""Replay statistics: counts, drops by reason, fps, latency percentiles per camera and per
server stage; the summary JSON and the table printed at the end.

Every frame read from the source is counted once: ``frames_source = frames_sent +
frames_not_sent``, and ``frames_sent = frames_answered + GIVEN_UP + REFUSED_DRAINING`` (the
client statuses, client_status.ClientStatus, of the frames the server never answered).

Latency percentiles are over every answer of a replay of up to ``LATENCY_WINDOW`` answers (per
camera, and per server stage); past that (``--loop``, a live camera) over the last
``LATENCY_WINDOW``, and the summary then says so (``latency_window``).
"""

from __future__ import annotations

import threading
import time
from array import array
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from client.client_status import ClientStatus, Unanswered
from client.frames import DropReason, FrameResult, FrameStatus, drop_reason

STAGES = ("queue", "preprocess", "inference", "postprocess", "total")

# Latencies kept per list (overall, per camera, per server stage) for the percentiles: a --loop
# or live replay runs for days, and kept whole they grew without bound. 8 bytes a value, so at
# most 0.8 MB a list; a drive of up to this many answers keeps its exact percentiles. Not a
# measured value (the camera node keeps 10 000: it reports a live window, not a run).
LATENCY_WINDOW = 100_000


class LatencyWindow:
    """The last ``size`` values added (all of them until there are more), for percentiles:
    their order is not kept. Not thread-safe (ReplayStats holds its lock)."""

    def __init__(self, size: int = LATENCY_WINDOW) -> None:
        if size < 1:
            raise ValueError(f"a latency window holds at least 1 value, not {size}")
        self.size = size
        self.count = 0  # values ever added
        self._values = array("d")
        self._next = 0  # where the next value goes once the window is full

    def append(self, value: float) -> None:
        self.count += 1
        if len(self._values) < self.size:
            self._values.append(value)
        else:
            self._values[self._next] = value
            self._next = (self._next + 1) % self.size

    @property
    def windowed(self) -> bool:
        """Whether values were left out: the percentiles are over the last ``size`` only."""
        return self.count > self.size

    def __len__(self) -> int:
        return len(self._values)

    def values(self) -> np.ndarray:
        return np.frombuffer(self._values, np.float64).copy() if self._values else np.empty(0)


def percentiles(values: Sequence[float] | LatencyWindow | np.ndarray) -> dict[str, float]:
    """p50 / p95 / p99 (linear interpolation); zeros when there are no values."""
    arr = values.values() if isinstance(values, LatencyWindow) else np.asarray(values, np.float64)
    if not arr.size:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    p = np.percentile(arr, [50, 95, 99])
    return {"p50": round(float(p[0]), 3), "p95": round(float(p[1]), 3), "p99": round(float(p[2]), 3)}


class ReplayStats:
    """Thread-safe accumulator fed by every stream's receiver thread. ``latency_window``: the
    most latencies kept per list for the percentiles (see the module docstring)."""

    def __init__(self, latency_window: int = LATENCY_WINDOW) -> None:
        self._lock = threading.Lock()
        self._window = latency_window
        self.frames_sent = 0
        self.frames_answered = 0
        self.detections = 0
        self.dropped: dict[DropReason, int] = defaultdict(int)
        self.latency_ms = LatencyWindow(latency_window)
        self.stage_ms: dict[str, LatencyWindow] = {s: LatencyWindow(latency_window) for s in STAGES}
        self.per_camera: dict[str, dict[str, Any]] = {}
        self.lost = 0  # sent, never answered: the GIVEN_UP and REFUSED_DRAINING frames
        self.client_status: dict[ClientStatus, int] = dict.fromkeys(ClientStatus, 0)
        self.drain_refusals = 0  # refusals by a draining server (the frames were re-sent)
        self.reconnects = 0
        self.started = time.perf_counter()
        self.finished: float | None = None

    def sent(self, camera_id: str, n: int = 1) -> None:
        with self._lock:
            self.frames_sent += n
            cam = self._camera(camera_id)
            cam["sent"] += n

    def unanswered(self, record: Unanswered) -> None:
        """A frame the server never answered, by its client status."""
        with self._lock:
            self.client_status[record.status] += 1

    def _camera(self, camera_id: str) -> dict[str, Any]:
        cam = self.per_camera.get(camera_id)
        if cam is None:
            cam = self.per_camera[camera_id] = {"sent": 0, "frames": 0, "latency": LatencyWindow(self._window),
                                                "first": None, "last": None}
        return cam

    def add(self, result: FrameResult) -> None:
        now = time.perf_counter()
        with self._lock:
            self.frames_answered += 1
            cam = self._camera(result.camera_id)
            cam["frames"] += 1
            cam["latency"].append(result.latency_ms)
            cam["first"] = now if cam["first"] is None else cam["first"]
            cam["last"] = now
            self.latency_ms.append(result.latency_ms)
            if result.status is FrameStatus.OK:
                self.detections += len(result.detections)
                t = result.timings
                stage_us = (t.queue_us, t.preprocess_us, t.inference_us, t.postprocess_us, t.total_us)
                for stage, us in zip(STAGES, stage_us, strict=True):
                    self.stage_ms[stage].append(us / 1e3)
            else:
                self.dropped[drop_reason(result.status)] += 1

    def finish(self) -> None:
        self.finished = time.perf_counter()

    @property
    def duration_s(self) -> float:
        return max(1e-9, (self.finished or time.perf_counter()) - self.started)

    def as_dict(self) -> dict[str, Any]:
        """The --summary-json object (shared interface)."""
        with self._lock:
            dur = self.duration_s
            per_camera = {}
            for cam_id, cam in sorted(self.per_camera.items()):
                span = (cam["last"] - cam["first"]) if cam["frames"] > 1 else 0.0
                fps = (cam["frames"] - 1) / span if span > 0 else (cam["frames"] / dur)
                per_camera[cam_id] = {
                    "frames": cam["frames"],
                    "sent": cam["sent"],
                    "fps": round(fps, 3),
                    "latency_ms": percentiles(cam["latency"]),
                }
            # Plain-string keys, sorted, then "lost": the summary JSON is a shared interface.
            dropped = {reason.value: n for reason, n in sorted(self.dropped.items(), key=lambda kv: kv[0].value)}
            if self.lost:
                dropped[DropReason.LOST.value] = self.lost
            not_sent = self.client_status[ClientStatus.NOT_SENT]
            windows = [self.latency_ms, *self.stage_ms.values(), *(c["latency"] for c in self.per_camera.values())]
            windowed = {"latency_window": self._window} if any(w.windowed for w in windows) else {}
            return {
                "frames_source": self.frames_sent + not_sent,
                "frames_sent": self.frames_sent,
                "frames_not_sent": not_sent,
                "frames_answered": self.frames_answered,
                "client_status": {status.value: n for status, n in self.client_status.items()},
                "dropped": dropped,
                "detections": self.detections,
                "fps": round(self.frames_answered / dur, 3),
                "duration_s": round(dur, 3),
                "latency_ms": percentiles(self.latency_ms),
                # Only when some percentiles are over the last this-many answers, not the whole replay.
                **windowed,
                "per_camera": per_camera,
                "server_stage_ms": {s: percentiles(v) for s, v in self.stage_ms.items()},
                "reconnects": self.reconnects,
                "drain_refusals": self.drain_refusals,
            }


def format_table(summary: dict[str, Any]) -> str:
    """The human-readable summary printed on stdout."""
    lines = []
    dropped = summary["dropped"]
    drop_text = ", ".join(f"{k} {v}" for k, v in dropped.items()) if dropped else "none"
    lines.append(
        f"frames sent {summary['frames_sent']}  answered {summary['frames_answered']}  "
        f"dropped {sum(dropped.values())} ({drop_text})  detections {summary['detections']}"
    )
    client = summary.get("client_status", {})
    if any(client.values()):
        never = [f"{name} {n}" for name, n in client.items() if n and name != ClientStatus.NOT_SENT.value]
        lines.append(
            f"frames read {summary['frames_source']} = sent {summary['frames_sent']} + "
            f"not sent {summary['frames_not_sent']}" + (f"; never answered: {', '.join(never)}" if never else "")
        )
    lines.append(
        f"duration {summary['duration_s']:.2f} s  fps {summary['fps']:.1f}  "
        f"reconnect attempts {summary.get('reconnects', 0)}"
        + (f"  re-sent after a drain {summary['drain_refusals']}" if summary.get("drain_refusals") else "")
    )
    lines.append("")
    header = f"{'latency (ms)':<28}{'p50':>9}{'p95':>9}{'p99':>9}"
    if summary.get("latency_window"):  # the percentiles are no longer over the whole replay: say so
        header += f"  (over the last {summary['latency_window']} answers)"
    lines.append(header)
    lines.append("-" * len(header))

    def row(name: str, p: dict[str, float]) -> str:
        return f"{name:<28}{p['p50']:>9.2f}{p['p95']:>9.2f}{p['p99']:>9.2f}"

    lines.append(row("client round trip", summary["latency_ms"]))
    for stage, p in summary["server_stage_ms"].items():
        lines.append(row(f"  server {stage}", p))
    cams = summary.get("per_camera", {})
    if len(cams) > 1:
        for cam, c in cams.items():
            lines.append(row(f"camera {cam} ({c['fps']:.1f} fps)", c["latency_ms"]))
    kpi = summary.get("kpi")
    if kpi:
        lines.append("")
        keys = [k for k in ("map50_95", "map50", "precision", "recall") if k in kpi]
        lines.append("KPI  " + "  ".join(f"{k} {float(kpi[k]):.4f}" for k in keys))
        if "frames_evaluated" in kpi:  # what the score is over: frames left out change it
            lines.append(f"     over {kpi['frames_evaluated']} frames; answered frames with no ground-truth image "
                         f"{kpi.get('frames_without_gt', 0)}, ground-truth images not replayed "
                         f"{kpi.get('gt_images_not_replayed', 0)}")
        if kpi.get("unknown_class_detections"):
            lines.append(f"     detections left out, of a class the ground truth does not have: "
                         f"{kpi['unknown_class_detections']}")
        if kpi.get("classes_matched_by") == "class id":
            lines.append("     classes matched by class id, in category id order: no class name is a category's")
    tracking = summary.get("tracking")
    if tracking:
        if not kpi:
            lines.append("")
        name = "tracking"
        if tracking.get("min_gt_height"):
            name += f" (ground truth under {float(tracking['min_gt_height']):g} px don't care)"
        lines.append(_tracking_row(name, tracking["overall"]))
        cameras = tracking.get("cameras", {})
        if len(cameras) > 1:
            for cam, scores in cameras.items():
                lines.append(_tracking_row(f"  camera {cam}", scores))
    return "\n".join(lines)


def _tracking_row(name: str, scores: dict[str, Any]) -> str:
    """One line of tracking scores (client.track_scoring.TrackScores.to_dict(); None = undefined)."""

    def rate(key: str) -> str:
        v = scores.get(key)
        return "n/a" if v is None else f"{float(v):.4f}"

    return (
        f"{name}  MOTA {rate('mota')}  IDF1 {rate('idf1')}  ID switches {scores['id_switches']}  "
        f"fragmentations {scores['fragmentations']}  precision {rate('precision')}  recall {rate('recall')}"
    )
