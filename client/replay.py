"""Replaying a recording against a server: one StreamDetect session per camera, all driven by
one pacing schedule so cameras stay in sync by their recorded timestamps.

Every answered frame goes to the sinks and the statistics. When the source turns out to be
damaged half-way, or the server is gone for good, the frames answered so far are kept: sinks
are closed properly and the error is re-raised for the CLI to print as one line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from client.convert import RequestOptions
from client.detector_client import DetectorClient
from client.frames import FrameResult, SourceFrame
from client.pacing import Pacing, paced
from client.sinks import Sink
from client.stream import StreamSession
from client.summary import ReplayStats
from perception.errors import PerceptionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayConfig:
    pacing: Pacing = field(default_factory=Pacing)
    options: RequestOptions | None = None
    # How long to wait, after the last frame is sent, for the answers still in flight.
    drain_timeout_s: float = 60.0
    keep_results: bool = True


@dataclass
class ReplayOutcome:
    stats: ReplayStats
    results: list[FrameResult]
    file_names: dict[tuple[str, int], str]
    error: PerceptionError | None = None
    interrupted: bool = False


class Replay:
    def __init__(
        self,
        client: DetectorClient,
        source: Iterable[SourceFrame],
        config: ReplayConfig,
        sinks: list[Sink] | None = None,
        on_progress: Callable[[FrameResult], None] | None = None,
    ) -> None:
        self._client = client
        self._source = source
        self._config = config
        self._sinks = list(sinks or [])
        self._on_progress = on_progress
        self._lock = threading.Lock()
        self._sessions: dict[str, StreamSession] = {}
        self.stop = threading.Event()
        self.stats = ReplayStats()
        self.results: list[FrameResult] = []
        self.file_names: dict[tuple[str, int], str] = {}
        self._sink_error: BaseException | None = None
        self.interrupted = False

    def _on_result(self, frame: SourceFrame, result: FrameResult) -> None:
        if frame.file_name:
            result.extra.setdefault("file_name", frame.file_name)
        with self._lock:
            self.stats.add(result)
            if self._config.keep_results:
                self.results.append(result)
            try:
                for sink in self._sinks:
                    sink.write(frame, result)
            except Exception as exc:  # a full disk must stop the replay, not kill the receiver thread
                if self._sink_error is None:
                    self._sink_error = exc
                self.stop.set()
        if self._on_progress is not None:
            self._on_progress(result)

    def _session(self, camera_id: str) -> StreamSession:
        s = self._sessions.get(camera_id)
        if s is None:
            s = self._client.stream(self._on_result, self._config.options, name=f"camera {camera_id}")
            self._sessions[camera_id] = s
        return s

    def run(self) -> ReplayOutcome:
        """Replay to the end (or until ``stop`` is set); never raises for a damaged source or
        a lost server: the error is in the outcome, with everything answered before it."""
        source_error: PerceptionError | None = None
        session_error: PerceptionError | None = None
        frames = paced(self._source, self._config.pacing, self.stop)
        try:
            while not self.stop.is_set():
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                except PerceptionError as exc:  # a damaged recording: keep what was answered
                    source_error = exc
                    break
                if frame.file_name:
                    self.file_names[(frame.camera_id, frame.sequence)] = frame.file_name
                try:
                    self._send(frame)
                except PerceptionError as exc:  # the server is gone for good
                    session_error = exc
                    break
        except KeyboardInterrupt:
            # Ctrl-C: stop sending, keep what was answered, let the CLI write its outputs.
            self._abort_all()
            session_error = PerceptionError("interrupted")
            self.interrupted = True
        except BaseException:
            self._abort_all()
            raise
        if session_error is not None or self._sink_error is not None:
            self._abort_all()
            error = session_error
        else:
            try:
                error = self._drain() or source_error
            except KeyboardInterrupt:
                self._abort_all()
                error, self.interrupted = PerceptionError("interrupted"), True
        self.stats.finish()
        self.stats.reconnects = sum(s.reconnects for s in self._sessions.values())
        self.stats.lost = sum(len(s.lost) for s in self._sessions.values())
        if self._sink_error is not None:
            sink_error = self._sink_error
            error = (
                sink_error
                if isinstance(sink_error, PerceptionError)
                else PerceptionError(f"writing results failed: {sink_error}")
            )
        return ReplayOutcome(self.stats, self.results, self.file_names, error, self.interrupted)

    def _send(self, frame: SourceFrame) -> None:
        session = self._session(frame.camera_id)
        while not session.send(frame, timeout=0.5):
            if self.stop.is_set():
                return
        self.stats.sent(frame.camera_id)

    def _drain(self) -> PerceptionError | None:
        first: PerceptionError | None = None
        for s in self._sessions.values():
            try:
                s.close(timeout=self._config.drain_timeout_s)
            except PerceptionError as exc:
                first = first or exc
        return first

    def _abort_all(self) -> None:
        for s in self._sessions.values():
            s.abort()

    def __enter__(self) -> Replay:
        return self

    def __exit__(self, *_: Any) -> None:
        self._abort_all()
