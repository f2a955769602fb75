"""The send window of one StreamDetect session, across reconnects: which frames are accepted,
which are on the wire unanswered, which to re-send after a reconnect, how long to back off,
and when to give up (after a streak of failures that lasted too long, see ``BackoffConfig``).

No gRPC, no threads, no clock: the sync (``stream.py``) and asyncio (``aio_client.py``) fronts
call it under their own lock and pass the time in, so both follow one set of rules and the
rules are tested without a server.

Invariants, kept by every method:

- A frame is accepted into the window at most ``window`` at a time; ``in_flight`` counts the
  accepted frames not yet answered (queued or on the wire).
- Every accepted frame ends exactly once: answered (``answer``) or ``lost`` (give-up or abort).
  An answer to a frame that is not on the wire (a re-sent duplicate) changes nothing.
- A frame a draining server refused (``refuse``) is not answered: it stays on the wire, to be
  re-sent on the next connection, and its refusal is remembered (``refusals``) until it is
  answered, so a frame lost after a refusal can say so. A refusal does not end a failure
  streak: only an answer proves the service works.
- The time bound of a streak counts from a failure with frames waiting: an idle session whose
  stream drops now and then never gives up by time (there is nothing to give up on).
- After a reconnect the frames that were on the wire are re-sent first, in the order they were
  first sent, then the queue continues; so one camera's answers stay in sequence order.
- A connection is a *generation*; a request stream of an ended generation stops taking frames,
  so two connections never send the same queued frame.
- A connection is wanted only while a frame is in flight (or to end the session): each one
  holds a stream slot of the server, so a session with nothing to send opens none, and one
  quiet for a while ends its request stream itself (``close_if_idle``). That end is no failure:
  no reconnect is counted, no backoff runs, the next frame opens the next connection.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import Enum

from client.backoff import Backoff
from client.frames import SourceFrame
from perception.errors import ConfigError, InvalidInputError, PerceptionError

FrameKey = tuple[str, int]  # (camera_id, sequence): how an answer names its frame


class Next(Enum):
    """What the connection loop does after a connection failed."""

    RECONNECT = "reconnect"  # wait ``delay_s``, then connect again and re-send
    IDLE = "idle"  # nothing waited on the connection: connect again at the next frame, no failure
    GIVE_UP = "give up"  # this failure ended the session: ``error`` is set, frames are in ``lost``
    STOP = "stop"  # the session had already ended (aborted or gave up): nothing to do


@dataclass(frozen=True)
class AfterFailure:
    """The decision ``ResendWindow.after_failure`` takes.

    first_of_streak: the first failure since the last answer (worth a warning; the retries that
        follow it are not news).
    """

    next: Next
    delay_s: float = 0.0
    first_of_streak: bool = False


@dataclass(frozen=True)
class Answered:
    """An answered frame. latency_ms: from its last write to the wire to ``now`` of ``answer``.
    reconnected: the first answer after one or more failed connections (the backoff restarts)."""

    frame: SourceFrame
    latency_ms: float
    reconnected: bool


@dataclass
class _OnWire:
    frame: SourceFrame
    sent: float  # the caller's clock (seconds) when last written to the wire


class ResendWindow:
    """Window, re-send and give-up state of one stream session (not thread-safe: the caller
    holds its lock around every call)."""

    def __init__(self, window: int, backoff: Backoff, name: str = "stream") -> None:
        if window < 1:
            raise ConfigError(f"window must be >= 1, got {window}")
        self.window = window
        self.name = name
        self._backoff = backoff  # bounds the failures with frames waiting
        self._queue: deque[SourceFrame] = deque()  # accepted, not yet on the wire
        self._on_wire: OrderedDict[FrameKey, _OnWire] = OrderedDict()  # in first-sent order
        self._closed = False
        self._generation = 0
        self._quiet_since: float | None = None  # the caller's clock: nothing in flight since then
        self._idle_closed = False  # the current connection's request stream ended: it was quiet
        self._idle_closed_at = 0.0  # when (the caller's clock)
        self._error: PerceptionError | None = None
        self.reconnects = 0
        self.lost: list[SourceFrame] = []
        self.accepted = 0  # frames ever accepted
        self.refused = 0  # refusals by a draining server, re-sent or not
        # Frames refused and not answered since -> the server's words; kept for lost frames.
        self.refusals: dict[FrameKey, str] = {}
        self.give_up_note = ""  # how the session gave up by itself (bound reached, not retryable)

    # -- state ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Accepted frames not answered yet (queued or on the wire)."""
        return len(self._queue) + len(self._on_wire)

    @property
    def error(self) -> PerceptionError | None:
        """Why the session ended without answering everything (give-up or abort), else None."""
        return self._error

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def wants_connection(self) -> bool:
        """Whether the connection loop should connect now (``begin_connection``): a frame is in
        flight, or the session is closing or ended (``begin_connection`` then says whether
        anything is left). Otherwise it waits: an open call holds one of the server's stream
        slots, which a session with nothing to send must leave to others."""
        return self.in_flight > 0 or self._closed or self._error is not None

    @property
    def ended_quietly(self) -> bool:
        """The current connection ended because it was quiet (``close_if_idle``) and every
        frame sent on it was answered: no failure, nothing to re-send."""
        return self._idle_closed and not self._on_wire

    @property
    def finished(self) -> bool:
        """Closed and every accepted frame answered: the session ended well."""
        return self._closed and not self._queue and not self._on_wire

    # -- caller side ---------------------------------------------------------------------

    @property
    def can_accept(self) -> bool:
        """Whether ``accept`` would not have to wait: a free slot. A session that ended has
        emptied its window, so a waiting sender wakes up and ``accept`` raises its error."""
        return self.in_flight < self.window

    def accept(self, frame: SourceFrame) -> None:
        """Take a frame into the window. Raises the session's error once it ended, and
        PerceptionError after ``close``; the caller waits for ``can_accept`` first.
        InvalidInputError for a frame whose (camera_id, sequence) is already in flight."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise PerceptionError(f"{self.name}: send() after close()")
        if self.in_flight >= self.window:
            raise PerceptionError(f"{self.name}: window of {self.window} is full; wait for can_accept")
        key = (frame.camera_id, frame.sequence)
        # Answers name their frame by this key: a second frame under it could never be told apart.
        if key in self._on_wire or any((f.camera_id, f.sequence) == key for f in self._queue):
            raise InvalidInputError(f"{self.name}: frame {key} is already in flight")
        self._queue.append(frame)
        self.accepted += 1

    def close(self) -> None:
        """No more frames; the session finishes when the accepted ones are answered."""
        self._closed = True

    def abort(self, error: PerceptionError) -> None:
        """End now: every unanswered frame goes to ``lost``. An earlier error is kept."""
        self._closed = True
        if self._error is None:
            self._error = error
        self._give_up()

    # -- connection side -----------------------------------------------------------------

    def begin_connection(self) -> int | None:
        """Start a connection: its generation, or None when there is nothing left to connect
        for (finished, gave up or aborted)."""
        if self._error is not None or self.finished:
            return None
        self._generation += 1
        self._quiet_since = None
        self._idle_closed = False
        return self._generation

    def end_connection(self) -> None:
        """The connection is over (for whatever reason): its request stream must stop."""
        self._generation += 1

    def resend(self, now: float) -> list[SourceFrame]:
        """The frames to write first on a new connection: those on the wire and unanswered,
        in the order they were first sent. Their latency counts from ``now``."""
        for entry in self._on_wire.values():
            entry.sent = now
        return [entry.frame for entry in self._on_wire.values()]

    def has_work(self, generation: int) -> bool:
        """Whether the request stream of ``generation`` can stop waiting: a frame is queued, or
        the stream has to end (closed, its connection ended, the session ended)."""
        return bool(self._queue) or self._closed or generation != self._generation or self._error is not None

    def close_if_idle(self, generation: int, now: float, after_s: float) -> bool:
        """Whether the request stream of ``generation`` should end now because nothing has
        been in flight for ``after_s`` seconds (since the last answer, or since the stream
        first found nothing to send); then the connection ``ended_quietly`` once its call
        ends. ``now``: the caller's clock in seconds, the one ``answer`` gets."""
        if generation != self._generation or self.in_flight > 0:
            return False
        if self._quiet_since is None:
            self._quiet_since = now
        if now - self._quiet_since < after_s:
            return False
        self._idle_closed = True
        self._idle_closed_at = now
        return True

    def take(self, generation: int, now: float) -> SourceFrame | None:
        """The next queued frame for the request stream of ``generation``, now on the wire; None
        when that stream must end (its connection ended, the session ended, or closed and
        drained: the half-close lets the server answer the rest). Call once ``has_work``."""
        if generation != self._generation or self._error is not None:
            return None
        if not self._queue:
            if not self._closed:
                raise RuntimeError(f"{self.name}: take() with nothing queued; wait for has_work()")
            return None
        frame = self._queue.popleft()
        self._on_wire[(frame.camera_id, frame.sequence)] = _OnWire(frame, now)
        return frame

    def answer(self, camera_id: str, sequence: int, now: float) -> Answered | None:
        """The server answered (camera_id, sequence): its frame leaves the window. None for an
        answer to a frame that is not on the wire (a duplicate of a re-sent frame): ignore it."""
        key = (camera_id, int(sequence))
        entry = self._on_wire.pop(key, None)
        if entry is None:
            return None
        self.refusals.pop(key, None)
        if self.in_flight == 0:
            self._quiet_since = now
        # An answer proves the connection works: the next failure starts a new streak.
        reconnected = self._backoff.attempts > 0
        self._backoff.reset()
        return Answered(entry.frame, (now - entry.sent) * 1e3, reconnected)

    def refuse(self, camera_id: str, sequence: int, message: str) -> SourceFrame | None:
        """A draining server refused (camera_id, sequence) unprocessed, saying ``message``: the
        frame stays on the wire and goes out again first on the next connection. None for a
        frame that is not on the wire (ignore it, as a duplicate answer)."""
        key = (camera_id, int(sequence))
        entry = self._on_wire.get(key)
        if entry is None:
            return None
        self.refused += 1
        self.refusals[key] = message
        return entry.frame

    def after_failure(self, failure: PerceptionError, retryable: bool, now: float | None = None) -> AfterFailure:
        """A connection failed with ``failure``: reconnect after a backoff delay, or give up
        (not retryable, or the streak of failures reached a bound of the ``BackoffConfig``)
        with ``failure`` as the session's error, the unanswered frames in ``lost`` and
        ``give_up_note`` saying how. ``now``: the caller's clock in seconds, for the time
        bound (without it only ``max_attempts`` bounds the streak)."""
        if self._error is not None:
            return AfterFailure(Next.STOP)
        if retryable and self.in_flight == 0:
            # A connection ended with no frame waiting (the server's idle timeout, a restart
            # between frames): nothing was lost and nothing can be given up on, whatever the
            # attempt bound. No reconnect: the next frame opens the next connection, and the
            # bounded streak starts at the first failure that keeps frames waiting.
            return AfterFailure(Next.IDLE)
        delay = self._backoff.next_delay(now) if retryable else None
        if delay is None:
            self._error = failure
            if not retryable:
                self.give_up_note = "gave up at once: not worth reconnecting"
            else:
                during = f" in {self._backoff.streak_s(now):.1f} s" if now is not None else ""
                self.give_up_note = f"gave up after {self._backoff.attempts} reconnect attempts{during}"
            self._give_up()
            return AfterFailure(Next.GIVE_UP)
        self.reconnects += 1
        return AfterFailure(Next.RECONNECT, delay, first_of_streak=self._backoff.attempts == 1)

    def stalled(self, now: float, timeout_s: float) -> bool:
        """Whether the oldest frame on the wire has waited longer than ``timeout_s``: a hung
        server sends no error, so only this shows the connection is dead. Also when frames
        wait for a call that this session half-closed as quiet more than ``timeout_s`` ago and
        the server has not ended: they go on the next call only, and a healthy server ends the
        call within a round trip."""
        if self._idle_closed and self._queue and now - self._idle_closed_at > timeout_s:
            return True
        if not self._on_wire:
            return False
        oldest = next(iter(self._on_wire.values()))
        return now - oldest.sent > timeout_s

    def _give_up(self) -> None:
        self.lost.extend(entry.frame for entry in self._on_wire.values())
        self.lost.extend(self._queue)
        self._on_wire.clear()
        self._queue.clear()


class WindowCounters:
    """What a session front (sync or asyncio) reports about its ``ResendWindow``: one set of
    read-only counters for both."""

    _window: ResendWindow

    @property
    def reconnects(self) -> int:
        """Connections re-opened after a failure."""
        return self._window.reconnects

    @property
    def lost(self) -> list[SourceFrame]:
        """Accepted frames never answered (the session gave up or was aborted)."""
        return self._window.lost

    @property
    def refusals(self) -> dict[FrameKey, str]:
        """(camera_id, sequence) -> what the draining server said, for each frame it refused
        that has not been answered since (re-sent and still in flight, or in ``lost``)."""
        return self._window.refusals

    @property
    def refused(self) -> int:
        """Refusals by a draining server (each refused frame is re-sent)."""
        return self._window.refused

