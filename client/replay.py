"""Replaying a recording against a server: one StreamDetect session per camera, all driven by
one pacing schedule so cameras stay in sync by their recorded timestamps.

With tracking asked for (``RequestOptions.track``) every answer carries ``tracks``, its
detections' track ids (0 where the server tracked none); without, none does.

Every frame the replay reads from the source ends in exactly one record, for the sinks and the
statistics:

- the server's answer, whatever its FrameStatus, delivered on a session's receiver thread. A
  frame a draining server refused is not answered yet: its session re-sends it after
  reconnecting (stream.py);
- or, once every session has ended (no answer can arrive any more), a client status with a
  reason (client_status.ClientStatus): GIVEN_UP or REFUSED_DRAINING for a frame sent and never
  answered, NOT_SENT for a frame read and never sent because the replay stopped first.

When the replay stops early (a session gave up reconnecting: the server is gone for good; an
output failed; Ctrl-C; ``stop``), the rest of the source is still read, without pacing, so that
each of its frames gets its NOT_SENT record (when Ctrl-C broke off the source's iterator, the
source is read again from the start, skipping the frames that already have a record). An
endless ``--loop`` has no rest, a damaged recording none that can be read, and a second Ctrl-C
skips it (logged). The error is in the outcome, for the CLI to print as one line after
closing the sinks.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from client.client_status import ClientStatus, Unanswered
from client.convert import RequestOptions
from client.detector_client import DetectorClient
from client.frames import FrameResult, SourceFrame, Tracks
from client.message_limit import MessageLimit
from client.pacing import Pacing, Schedule, select
from client.sinks import Sink
from client.sources.live_source import LiveSource
from client.stream import StreamSession
from client.summary import ReplayStats
from perception.errors import PerceptionError

log = logging.getLogger(__name__)

# After an abort a receiver thread ends as soon as its cancelled call returns; only an
# on_result call in progress (a sink write) can hold it up. Bounded so a stuck sink cannot
# hang the end of a replay.
_JOIN_TIMEOUT_S = 5.0

ProgressCallback = Callable[[FrameResult | Unanswered], None]


@dataclass(frozen=True)
class ReplayConfig:
    pacing: Pacing = field(default_factory=Pacing)
    options: RequestOptions | None = None
    # How long to wait, after the last frame is sent, for the answers still in flight. None: as
    # long as the sessions keep reconnecting (the client's BackoffConfig bounds that), so a server
    # restarting during the last frames is waited for like one restarting earlier.
    drain_timeout_s: float | None = None
    keep_results: bool = True


@dataclass
class ReplayOutcome:
    stats: ReplayStats
    results: list[FrameResult]
    # (camera_id, sequence) -> the file each frame was read from, for frames that have one (an
    # image folder's); kept, like ``results``, only with ``keep_results``.
    file_names: dict[tuple[str, int], str]
    error: PerceptionError | None = None
    interrupted: bool = False
    # Frames the server never answered, with their client status (kept with ``keep_results``).
    unanswered: list[Unanswered] = field(default_factory=list)


class Replay:
    def __init__(
        self,
        client: DetectorClient,
        source: Iterable[SourceFrame],
        config: ReplayConfig,
        sinks: list[Sink] | None = None,
        on_progress: ProgressCallback | None = None,
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
        self.unanswered: list[Unanswered] = []
        self.file_names: dict[tuple[str, int], str] = {}
        self._sink_error: BaseException | None = None
        self.interrupted = False
        self._last_recorded: dict[str, int] = {}  # camera -> the highest sequence with a record
        self._message_limit = MessageLimit(client, config.options)  # the largest request worth sending
        self._tracking = config.options is not None and config.options.track

    # -- records -------------------------------------------------------------------------

    def _on_result(self, frame: SourceFrame, result: FrameResult) -> None:
        if self._tracking and result.tracks is None:  # nothing tracked in it: every id 0
            result = dataclasses.replace(result, tracks=Tracks.untracked(len(result.detections)))
        if frame.file_name:
            result.extra.setdefault("file_name", frame.file_name)
        with self._lock:
            self.stats.add(result)
            self._recorded(frame.camera_id, frame.sequence)
            if self._config.keep_results:
                self.results.append(result)
            self._to_sinks(lambda sink: sink.write(frame, result))
        if self._on_progress is not None:
            self._on_progress(result)

    def _on_unanswered(self, record: Unanswered) -> None:
        with self._lock:
            self.stats.unanswered(record)
            self._recorded(record.camera_id, record.sequence)
            if self._config.keep_results:
                self.unanswered.append(record)
            self._to_sinks(lambda sink: sink.write_unanswered(record))
        if self._on_progress is not None:
            self._on_progress(record)

    def _recorded(self, camera_id: str, sequence: int) -> None:
        """(under ``self._lock``) A record of this frame was written: answers, frames lost and
        frames over the message limit alike, so that no frame gets a second record."""
        self._last_recorded[camera_id] = max(self._last_recorded.get(camera_id, -1), sequence)

    def _to_sinks(self, write: Callable[[Sink], None]) -> None:
        """Hand one record to every sink (under ``self._lock``); a failing sink stops the replay."""
        for sink in self._sinks:
            try:
                write(sink)
            except Exception as exc:  # a full disk must stop the replay, not kill the receiver thread
                if self._sink_error is None:
                    self._sink_error = exc
                self.stop.set()

    # -- the run -------------------------------------------------------------------------

    def _session(self, camera_id: str) -> StreamSession:
        s = self._sessions.get(camera_id)
        if s is None:
            s = self._client.stream(self._on_result, self._config.options, name=f"camera {camera_id}")
            self._sessions[camera_id] = s
        return s

    def run(self) -> ReplayOutcome:
        """Replay to the end (or until ``stop`` is set); never raises for a damaged source or
        a lost server: the error is in the outcome, and every frame read has its record."""
        frames = select(self._source, self._config.pacing)
        schedule = Schedule(self._config.pacing)
        source_error: PerceptionError | None = None
        session_error: PerceptionError | None = None
        stopped = ""  # why the replay stopped before the end of the source ("" = it did not)
        unsent: SourceFrame | None = None  # read, and not (yet) accepted by its session
        reading = False  # an interrupt inside the source's iterator ends that iterator
        try:
            while True:
                reading = True
                try:
                    frame = next(frames)
                except StopIteration:
                    reading = False  # the source ended: an interrupt from here on must not re-read it
                    break
                except PerceptionError as exc:  # a damaged recording: keep what was answered
                    source_error = exc
                    break
                unsent = frame  # before ``reading`` is cleared: an interrupt between them is safe
                reading = False
                # Kept for scoring, like the results: a --loop or live replay must not grow without bound.
                if frame.file_name and self._config.keep_results:
                    self.file_names[(frame.camera_id, frame.sequence)] = frame.file_name
                try:
                    sent = schedule.wait(frame, self.stop) and self._send(frame)
                except PerceptionError as exc:  # its session gave up: the server is gone for good
                    session_error = self._session_failure(frame.camera_id, exc)
                    stopped = f"the replay stopped: {session_error}"
                    break
                if not sent:
                    stopped = self._stop_reason()
                    break
                unsent = None
        except KeyboardInterrupt:
            # Ctrl-C: stop sending, keep what was answered, let the CLI write its outputs.
            self.interrupted = True
            stopped = "the replay was interrupted"
        except BaseException:
            self._abort_all(PerceptionError("the replay failed"))
            raise
        try:
            drain_error = self._end_sessions(stopped)
        except KeyboardInterrupt:  # a second Ctrl-C while the answers drain: stop waiting, keep the records
            self.interrupted = True
            stopped = stopped or "the replay was interrupted"
            self._abort_all(PerceptionError(stopped))
            drain_error = None
        self.stats.finish()
        self._account_lost()
        if stopped and source_error is None:
            self._account_not_sent(unsent, None if self.interrupted and reading else frames, stopped)
        for cam, session in self._sessions.items():
            self.stats.sent(cam, session.accepted)
        sessions = list(self._sessions.values())
        self.stats.reconnects = sum(x.reconnects for x in sessions)
        self.stats.lost = sum(len(x.lost) for x in sessions)
        self.stats.drain_refusals = sum(x.refused for x in sessions)
        error = session_error or drain_error or source_error
        if self._sink_error is not None:
            sink_error = self._sink_error
            error = (
                sink_error
                if isinstance(sink_error, PerceptionError)
                else PerceptionError(f"writing results failed: {sink_error}")
            )
        return ReplayOutcome(self.stats, self.results, self.file_names, error, self.interrupted, self.unanswered)

    def _send(self, frame: SourceFrame) -> bool:
        """Hand ``frame`` to its camera's session: False if ``stop`` was set while the window
        was full (the frame was not accepted); raises the session's error once it gave up.

        A frame over the message limit is not sent: the server would refuse it at its length
        prefix and end the camera's stream. It gets its NOT_SENT record, and the replay goes on."""
        too_large = self._message_limit.refusal(frame)
        if too_large:
            self._on_unanswered(Unanswered.of(frame, ClientStatus.NOT_SENT, too_large))
            return True
        session = self._session(frame.camera_id)
        while not session.send(frame, timeout=0.5):
            if self.stop.is_set():
                return False
        return True

    def _stop_reason(self) -> str:
        if self._sink_error is not None:
            return f"the replay stopped: writing results failed: {self._sink_error}"
        return "the replay was stopped"

    def _session_failure(self, camera_id: str, exc: PerceptionError) -> PerceptionError:
        """The session's error, saying how it gave up ("... (camera front gave up after 9
        reconnect attempts in 120.0 s)"), as the same kind of error."""
        s = self._sessions.get(camera_id)
        if s is None or not s.give_up_note:
            return exc
        return type(exc)(f"{exc} ({s.name} {s.give_up_note})")

    def _end_sessions(self, stopped: str) -> PerceptionError | None:
        """Close every session, waiting for its answers (after Ctrl-C or a failed output: abort
        it), then wait until no answer can arrive any more. The first session error."""
        first: PerceptionError | None = None
        if self.interrupted or self._sink_error is not None:
            self._abort_all(PerceptionError(stopped or self._stop_reason()))
        else:
            try:
                first = self._drain()
            except KeyboardInterrupt:
                self.interrupted = True
                self._abort_all(PerceptionError("the replay was interrupted"))
        for s in self._sessions.values():
            if not s.join(_JOIN_TIMEOUT_S):
                log.warning("%s: still delivering an answer after %.0f s", s.name, _JOIN_TIMEOUT_S)
        return first

    def _drain(self) -> PerceptionError | None:
        first: PerceptionError | None = None
        for camera_id, s in self._sessions.items():
            try:
                s.close(timeout=self._config.drain_timeout_s)
            except PerceptionError as exc:
                first = first or self._session_failure(camera_id, exc)
        return first

    def _abort_all(self, reason: PerceptionError | None = None) -> None:
        for s in self._sessions.values():
            s.abort(reason)

    # -- frames without an answer --------------------------------------------------------

    def _account_lost(self) -> None:
        """A GIVEN_UP or REFUSED_DRAINING record for every frame sent and never answered."""
        for s in self._sessions.values():
            why = str(s.error) if s.error is not None else "the session ended"
            if s.give_up_note:
                why = f"{why} ({s.name} {s.give_up_note})"
            for frame in s.lost:
                refusal = s.refusals.get((frame.camera_id, frame.sequence))
                if refusal:
                    reason = f"refused by a draining server ({refusal}); not re-sent: {why}"
                    self._on_unanswered(Unanswered.of(frame, ClientStatus.REFUSED_DRAINING, reason))
                else:
                    self._on_unanswered(Unanswered.of(frame, ClientStatus.GIVEN_UP, f"never answered: {why}"))

    def _last_with_record(self) -> dict[str, int]:
        """camera -> the sequence of its last frame with a record, once every session ended.
        A camera's frames are sent in sequence order and each one sent ends answered or lost,
        so a frame of it has a record exactly when its sequence is at most this. Taken from the
        records (answers, frames lost, frames over the message limit) rather than from ``send``,
        which Ctrl-C may break off half-way."""
        with self._lock:  # frames lost have their records by now (_account_lost runs first)
            return dict(self._last_recorded)

    def _account_not_sent(self, unsent: SourceFrame | None, rest: Iterator[SourceFrame] | None, why: str) -> None:
        """A NOT_SENT record for the frame the replay stopped at and for every frame after it:
        the rest of ``rest``, or, when the source's iterator was broken off (None), every frame
        of a new pass over the source that has no record yet."""
        last = self._last_with_record()
        if unsent is not None and unsent.sequence > last.get(unsent.camera_id, -1):
            self._on_unanswered(Unanswered.of(unsent, ClientStatus.NOT_SENT, why))
        pacing = self._config.pacing
        if pacing.loop and not pacing.max_frames:
            return  # an endless loop: there is no rest to account for
        if isinstance(self._source, LiveSource):
            return  # a live camera has no rest: reading on would record frames of after the run
        if rest is None:
            done = None if unsent is None else (unsent.camera_id, unsent.sequence)
            rest = (
                f for f in select(self._source, pacing)
                if f.sequence > last.get(f.camera_id, -1) and (f.camera_id, f.sequence) != done
            )
        log.info("recording the frames not sent (%s); Ctrl-C to skip", why)
        n = 0
        try:
            for frame in rest:
                self._on_unanswered(Unanswered.of(frame, ClientStatus.NOT_SENT, why))
                n += 1
        except PerceptionError as exc:  # damaged further on: those frames cannot be named
            log.warning("the recording is unreadable after %d frames not sent: %s", n, exc)
        except KeyboardInterrupt:
            self.interrupted = True
            log.warning("skipped: the frames after the %d recorded as not sent have no record", n)

    def __enter__(self) -> Replay:
        return self

    def __exit__(self, *_: Any) -> None:
        self._abort_all()
