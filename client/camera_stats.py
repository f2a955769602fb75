"""Per-camera counters of a camera node and the lines it prints (live table, final summary).

captured = frames read from the camera; sent = frames handed to the stream; dropped = frames
not sent because the link or the server could not take them: replaced by a newer one while the
send window was full (the link or the server was slower than the camera), or taken when every
stream to the server had given up on it; too_large = frames not sent because the server would
refuse them (over its message limit: client.message_limit); failed = frames not sent because of
an error of the node's own (a frame it could not turn into a request; logged); answered =
answers received, ``ok`` of them with status OK; lost = sent frames never answered (the stream
gave up on them, or the node stopped first); reconnects = times the camera delivered frames
again after a loss, open_failures = attempts to (re)open it that gave no frame (it would not
open, or opened and delivered none); server_reconnects = times the stream to the server was
reconnected. Once the node stopped, captured = sent + dropped + too_large + failed (+ 1: a frame
left in the mailbox) and sent = answered + lost: each frame is in one count.
Latency = send to answer, over the last ``LATENCY_WINDOW`` answers.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from perception.types import FrameStatus

# Latencies kept per camera for the percentiles: a node runs for days, so a sliding window
# (about 5 minutes at 30 fps) bounds memory; not a measured value.
LATENCY_WINDOW = 10_000


@dataclass(frozen=True)
class CameraSummary:
    camera_id: str
    source: str
    connected: bool
    captured: int
    sent: int
    answered: int
    ok: int
    dropped: int
    too_large: int
    lost: int
    open_failures: int
    reconnects: int
    server_reconnects: int
    p50_ms: float
    p99_ms: float
    last_error: str
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line: ``front: captured 300, sent 120, ok 118/120, dropped 180, ...``."""
        state = "" if self.connected else " [camera down]"
        too_large = f", too large to send {self.too_large}" if self.too_large else ""
        too_large += f", failed to send {self.failed}" if self.failed else ""
        return (
            f"{self.camera_id}: captured {self.captured}, sent {self.sent}, answered OK {self.ok}/{self.answered}, "
            f"dropped {self.dropped}{too_large}, lost {self.lost}, reconnects {self.reconnects} "
            f"(failed opens {self.open_failures}, server {self.server_reconnects}), "
            f"latency p50 {self.p50_ms:.1f} ms p99 {self.p99_ms:.1f} ms{state}"
        )


class CameraStats:
    """Counters of one camera; updated from its capture, sender and receiver threads."""

    def __init__(self, camera_id: str, source: str) -> None:
        self.camera_id = camera_id
        self.source = source
        self._lock = threading.Lock()
        self.connected = False
        self.captured = 0
        self.sent = 0
        self.answered = 0
        self.ok = 0
        self.dropped = 0  # taken to send, but no stream would take it; the mailbox counts the rest
        self.too_large = 0
        self.failed = 0
        self.lost = 0
        self.open_failures = 0
        self.reconnects = 0
        self.last_error = ""
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def count(self, field: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + n)

    def set_state(self, connected: bool, error: str = "") -> None:
        with self._lock:
            self.connected = connected
            if error:
                self.last_error = error

    def note(self, error: str) -> None:
        """Keep ``error`` as the last one, leaving ``connected`` as the capture thread set it."""
        with self._lock:
            self.last_error = error

    def answer(self, status: FrameStatus, latency_ms: float) -> None:
        with self._lock:
            self.answered += 1
            if status is FrameStatus.OK:
                self.ok += 1
            self._latencies.append(latency_ms)

    def summary(self, overwritten: int, server_reconnects: int) -> CameraSummary:
        """overwritten: frames the mailbox replaced by a newer one, the rest of ``dropped``."""
        with self._lock:
            lat = np.asarray(self._latencies, np.float64)
            p50, p99 = (float(v) for v in np.percentile(lat, [50, 99])) if lat.size else (0.0, 0.0)
            return CameraSummary(
                self.camera_id, self.source, self.connected, self.captured, self.sent, self.answered, self.ok,
                overwritten + self.dropped, self.too_large, self.lost, self.open_failures, self.reconnects,
                server_reconnects,
                round(p50, 3), round(p99, 3), self.last_error, self.failed,
            )


def format_table(rows: list[CameraSummary]) -> str:
    """The live table ``--stats-every`` prints."""
    head = f"{'camera':<16} {'captured':>8} {'sent':>6} {'ok':>6} {'dropped':>7} {'too big':>7} {'lost':>5} " \
           f"{'reconn':>6} {'p50 ms':>7} {'p99 ms':>7}  state"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.camera_id[:16]:<16} {r.captured:>8} {r.sent:>6} {r.ok:>6} {r.dropped:>7} {r.too_large:>7} {r.lost:>5} "
            f"{r.reconnects:>6} {r.p50_ms:>7.1f} {r.p99_ms:>7.1f}  {'up' if r.connected else 'DOWN'}"
        )
    return "\n".join(lines)
