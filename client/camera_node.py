"""A camera node: live cameras streamed to a detector server, newest frame first.

Per camera, two threads and one stream:

- the capture thread reads the camera continuously and puts every frame in a one-frame
  mailbox (latest_frame.py), so the camera's driver buffer never fills and a frame waiting
  for the link is replaced by a newer one (counted as ``dropped``);
- the sender takes the newest frame only when the stream's window has room, encodes it (JPEG,
  raw BGR, or into a shared-memory slot for a server on this host) and sends it; so at most
  ``window`` frames are ever in flight and a slow link or server drops old frames at the node
  instead of queueing them. A frame over the server's message limit (client.message_limit)
  is counted ``too_large`` and not sent: sent, it would end the stream;
- the ``StreamSession`` (stream.py) answers every sent frame in order, reconnecting to the
  server by itself; if it gives up (``--reconnect-timeout``) its frames count as ``lost`` and
  a new session takes over.

A camera that disappears (unplugged, stream server restarted) is reported, reopened with
exponential backoff (``Backoff`` with neither a time nor an attempt bound) and counted: a
reconnect once it delivers a frame again, a failed open for each attempt that gives none; the
node keeps running until ``stop`` is set. Invariants kept visibly below: the capture thread
never waits on the network; the sender never holds the mailbox while sending; answer
callbacks run on the session's receiver thread and take no lock of the session.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from numpy.typing import NDArray

from client.backoff import Backoff
from client.camera_stats import CameraStats, CameraSummary
from client.config import BackoffConfig
from client.convert import RequestOptions
from client.detector_client import DetectorClient
from client.errors import TOO_LARGE_HINT
from client.frames import FrameResult, FrameStatus, SourceFrame
from client.latest_frame import LatestFrame
from client.live_capture import Camera, Grab
from client.message_limit import MessageLimit
from client.shm_ring import DEFAULT_MODE, DEFAULT_PREFIX, ShmRing, check_mode, group_id
from client.sources.images import bgr_frame
from client.sources.live_source import encode_jpeg
from client.stream import ResultCallback, StreamSession
from perception.decode import PixelFormat
from perception.errors import ConfigError, DataError, PerceptionError

log = logging.getLogger(__name__)

# How often waiting threads look at the stop flag and a given-up stream (seconds); a stop
# takes at most this long to be noticed. Not a measurement.
_POLL_S = 0.2


class FrameEncoding(str, Enum):
    """How camera images go on the wire."""

    JPEG = "jpeg"  # smaller on the network; the server decodes
    RAW = "raw"  # BGR8 pixels: no encode / decode cost, for a server on the same host
    # BGR8 pixels in a shared-memory ring (client.shm_ring), only the slot's reference on the
    # wire: for a server on the same host started with --shm-allow covering ``shm_prefix``.
    SHM = "shm"


@dataclass(frozen=True)
class NodeConfig:
    """encode / jpeg_quality: wire format of camera images (recordings go as recorded).
    retry: camera reopen delays; its bounds are ignored, a camera is retried until stopped.
    stop_timeout_s: at stop, how long to wait for the answers to frames in flight."""

    encode: FrameEncoding = FrameEncoding.JPEG
    jpeg_quality: int = 90
    retry: BackoffConfig = field(
        default_factory=lambda: BackoffConfig(initial_s=0.5, max_s=10.0, give_up_after_s=0.0)
    )
    options: RequestOptions | None = None
    stop_timeout_s: float = 3.0
    shm_prefix: str = DEFAULT_PREFIX
    # Who may read the rings besides this node (client.shm_ring): a server running as another
    # user reads them through a shared group, e.g. mode 0o640 and group "perception-shm".
    shm_mode: int = DEFAULT_MODE
    shm_group: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        check_mode(self.shm_mode)
        if self.shm_group is not None:
            group_id(self.shm_group)  # a group that does not exist fails here, not at every frame
        if self.stop_timeout_s < 0:
            raise ConfigError("stop_timeout_s must not be negative")


REPEAT_LOG_S = 10.0  # the same reason (a stream replaced, a frame not sent) is logged at most this often


class RepeatedLog:
    """Whether a reason is worth logging now: not if it was logged less than REPEAT_LOG_S ago
    and nothing else came between (that time is counted instead). Used from one thread."""

    def __init__(self) -> None:
        self._reason = ""
        self._logged_at = float("-inf")
        self._repeats = 0

    def due(self, reason: str) -> str | None:
        """None: not now. Otherwise the suffix to log with it: how often it (or, for a new
        reason, the one before it) recurred unlogged."""
        now = time.monotonic()
        same = reason == self._reason
        if same and now - self._logged_at < REPEAT_LOG_S:
            self._repeats += 1
            return None
        again = ""
        if self._repeats:
            again = (f" ({self._repeats} more times since it was last logged)" if same else
                     f" (the reason before it recurred {self._repeats} more times unlogged: {self._reason})")
        self._reason, self._logged_at, self._repeats = reason, now, 0
        return again


class CameraWorker:
    """One camera: its capture thread, its sender thread and its stream to the server."""

    def __init__(
        self,
        camera_id: str,
        camera: Camera,
        client: DetectorClient,
        config: NodeConfig,
        stop: threading.Event,
        on_answer: ResultCallback | None = None,
        limit: MessageLimit | None = None,
    ) -> None:
        self.camera_id = camera_id
        self.stats = CameraStats(camera_id, camera.name)
        self._camera = camera
        self._client = client
        self._config = config
        self._stop = stop
        self._on_answer = on_answer
        self._slot: LatestFrame[tuple[int, Grab]] = LatestFrame()
        self._session: StreamSession | None = None
        self._ring: ShmRing | None = None  # --encode shm: made at the first frame, sized to it
        self._past_server_reconnects = 0
        self._session_lock = threading.Lock()  # _session and _past_server_reconnects, together
        self._limit = limit or MessageLimit(client, config.options)
        # A cause that recurs at every frame (a stream ended by the same error, frames over the
        # message limit) is logged once per REPEAT_LOG_S, not once per frame.
        self._replaced_log = RepeatedLog()
        self._too_large_log = RepeatedLog()
        self._failed_log = RepeatedLog()
        # Answers other than OK, one log per status: with one for all, stale, expired and
        # overloaded answers interleaving under overload each reset it, and every answer was logged.
        self._answer_logs: dict[str, RepeatedLog] = {}
        self._answer_log_lock = threading.Lock()
        self._retry = dataclasses.replace(config.retry, give_up_after_s=0.0, max_attempts=0)
        # Between replacement streams that got no answer (a server refusing every stream: a
        # wrong token, a full server), so that the node does not open one per frame.
        self._replace_backoff = Backoff(self._retry)
        self._answered_before = 0  # stats.answered when the current stream was opened
        self._threads = [
            threading.Thread(target=self._capture_loop, name=f"{camera_id}-capture", daemon=True),
            threading.Thread(target=self._send_loop, name=f"{camera_id}-send", daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    @property
    def busy(self) -> bool:
        """A thread of the camera is still running (after ``join``: stuck in a native call)."""
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout: float, deadline: float | None = None) -> None:
        """Wait for the threads, ``timeout`` s at most, or until ``deadline`` (monotonic) when
        given: one deadline for every camera of a node, not a timeout each."""
        end = deadline if deadline is not None else time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            # A capture blocked inside the camera driver / FFmpeg (bounded by its read timeout);
            # the threads are daemons, the process may exit under them.
            log.warning("%s: still busy after %.1fs; leaving it", self.camera_id, timeout)

    def summary(self) -> CameraSummary:
        with self._session_lock:  # a retired session's reconnects are in the past count, once
            session, past = self._session, self._past_server_reconnects
        live = session.reconnects if session is not None else 0
        return self.stats.summary(self._slot.overwritten, past + live)

    # -- capture thread ------------------------------------------------------------------

    def _capture_loop(self) -> None:
        backoff = Backoff(self._retry)
        sequence = 0
        lost_once = False
        name = self._camera.name
        while not self._stop.is_set():
            try:
                self._camera.open()
            except ConfigError as exc:  # cannot work by retrying (e.g. no GStreamer in this OpenCV)
                log.error("%s: %s", self.camera_id, exc)
                self.stats.set_state(False, str(exc))
                return
            except DataError as exc:
                self._open_failed(backoff, str(exc))
                continue
            except Exception as exc:  # a driver or library bug: retried as a failed open, as a read's
                # (it ended the capture thread: the node ran on idle, and exited 0 with nothing sent)
                log.exception("%s: opening %s failed", self.camera_id, name)
                self._open_failed(backoff, f"opening {name} failed ({type(exc).__name__}: {exc})")
                continue
            log.info("%s: capturing from %s", self.camera_id, name)
            delivered = False
            why = ""
            try:
                while not self._stop.is_set():
                    grab = self._camera.read()
                    if grab is None:
                        break
                    if not delivered:  # the camera is back only now: opened, it may still give nothing
                        delivered = True
                        backoff.reset()
                        self.stats.set_state(True)
                        if lost_once:
                            self.stats.count("reconnects")
                    self.stats.count("captured")
                    self._slot.put((sequence, grab))
                    sequence += 1
            except DataError as exc:
                why = str(exc)
            except Exception as exc:  # a driver or decoder bug: a lost camera, reopened, not a dead thread
                log.exception("%s: capturing from %s failed", self.camera_id, name)
                why = f"failed ({type(exc).__name__}: {exc})"
            finally:
                self._camera.close()
            if self._stop.is_set():
                break
            if not delivered:  # an attempt that failed, not a camera back and lost again
                self._open_failed(backoff, f"camera {name} {why or 'opened, but delivered no frame'}")
                continue
            why = why or "stopped delivering frames"
            lost_once = True
            self.stats.set_state(False, f"{name}: {why}")
            delay = backoff.next_delay() or self._retry.max_s
            log.warning("%s: camera %s %s; reopening in %.1fs", self.camera_id, name, why, delay)
            self._stop.wait(delay)

    def _open_failed(self, backoff: Backoff, why: str) -> None:
        """An attempt to (re)open the camera that gave no frame: counted ``open_failures`` and
        retried after the backoff's next delay; said at WARNING once a streak, then at INFO."""
        self.stats.count("open_failures")
        self.stats.set_state(False, why)
        delay = backoff.next_delay() or self._retry.max_s
        level = logging.WARNING if backoff.attempts == 1 else logging.INFO
        log.log(level, "%s: %s; retrying in %.1fs", self.camera_id, why, delay)
        self._stop.wait(delay)

    # -- sender thread -------------------------------------------------------------------

    def _send_loop(self) -> None:
        session: StreamSession | None = self._new_session()
        try:
            while session is not None and not self._stop.is_set():
                item = self._slot.take(functools.partial(self._has_room, session), _POLL_S)
                if item is None:
                    if session.error is not None:
                        session, _ = self._replace(session)  # None: stopped while waiting to reopen
                    continue
                try:
                    frame = self._to_frame(*item)
                    too_large = self._limit.refusal(frame)
                except Exception as exc:  # e.g. a recorded raw frame shorter than its size says
                    self._failed(item[0], exc)
                    continue
                if too_large:
                    # The server would end the stream at its length prefix, with every frame in
                    # flight beside it; the next frame of this camera is most likely as large.
                    self.stats.count("too_large")
                    again = self._too_large_log.due("too large")  # its size varies a little
                    if again is not None:
                        log.error("%s: frame %d: %s%s", self.camera_id, frame.sequence, too_large, again)
                    continue
                session = self._send(session, frame)  # None: stopped while waiting to reopen
        finally:
            if session is not None:  # a session replaced is retired already
                self._finish(session)
            elif self._ring is not None:  # stopped while waiting to reopen: no session, the ring all the same
                self._ring.close()

    def _send(self, session: StreamSession, frame: SourceFrame) -> StreamSession | None:
        """Send ``frame``; the session to go on with (None: stopped while waiting to reopen).
        When the session has given up on the server, a new one takes its place and the frame
        goes first on it (it is the newest frame: it used to be in no count at all), unless the
        camera gave a newer one while the node waited to reopen (backoff): then this one is
        ``dropped`` and the newest goes. A server refusing every stream (e.g. a wrong token)
        refuses the new one only once it took the frame (a stream opens its call at its first
        frame): that frame is ``sent``, then ``lost``. Should the new one have ended before
        taking it all the same, the frame is ``dropped`` like every frame the server cannot
        take, not ``failed``: that is the count of the node's own errors."""
        for _ in range(2):
            try:
                if session.send(frame, timeout=_POLL_S):
                    self.stats.count("sent")
                return session
            except PerceptionError:  # the session gave up on the server; _replace says why
                replaced, waited = self._replace(session)
                if replaced is None or (waited and self._slot.holds()):
                    self.stats.count("dropped")
                    return replaced
                session = replaced
            except Exception as exc:
                self._failed(frame.sequence, exc)
                return session
        self.stats.count("dropped")
        return session

    def _failed(self, sequence: int, exc: Exception) -> None:
        """A frame that could not be sent for a reason of this node's own: counted ``failed``,
        logged (with its traceback) once per REPEAT_LOG_S; the sender goes on with the next."""
        self.stats.count("failed")
        why = f"{type(exc).__name__}: {exc}"
        self.stats.note(f"frame {sequence} not sent: {why}")
        again = self._failed_log.due(type(exc).__name__)
        if again is not None:
            log.error("%s: frame %d not sent: %s%s", self.camera_id, sequence, why, again, exc_info=exc)

    def _has_room(self, session: StreamSession) -> bool:
        return session.error is not None or session.in_flight < self._client.config.window

    def _to_frame(self, sequence: int, grab: Grab) -> SourceFrame:
        if grab.frame is not None:
            raw = grab.frame.raw
            if (self._config.encode is FrameEncoding.SHM and raw is not None and raw.row_stride in (0, raw.width * 3)
                    and raw.pixel_format is PixelFormat.BGR8):
                pixels = np.frombuffer(raw.data, np.uint8).reshape(raw.height, raw.width, 3)
                slot = self._ring_for(pixels).write(pixels)
                return SourceFrame(self.camera_id, sequence, grab.timestamp_ns, shm=slot)
            return dataclasses.replace(grab.frame, camera_id=self.camera_id, sequence=sequence,
                                       timestamp_ns=grab.timestamp_ns, file_name="")
        assert grab.image is not None  # a Grab holds an image or a frame
        if self._config.encode is FrameEncoding.SHM:
            slot = self._ring_for(grab.image).write(grab.image)
            return SourceFrame(self.camera_id, sequence, grab.timestamp_ns, shm=slot)
        if self._config.encode is FrameEncoding.RAW:
            return bgr_frame(self.camera_id, sequence, grab.timestamp_ns, grab.image)
        data = encode_jpeg(grab.image, self._config.jpeg_quality)
        return SourceFrame(self.camera_id, sequence, grab.timestamp_ns, encoded=data)

    def _ring_for(self, image: NDArray[np.uint8]) -> ShmRing:
        """This camera's ring, (re)made when a frame does not fit it (a camera reopened at another
        size). A slot is rewritten only once ``window + 1`` newer frames were sent, and at most
        ``window`` frames are unanswered, so the server never finds one of ours overwritten
        before it read it (it would answer that frame INVALID, never with other pixels)."""
        ring = self._ring
        if ring is None or image.nbytes > ring.slot_bytes:
            if ring is not None:
                ring.close()  # frames still in flight in it are answered INVALID
            ring = self._ring = ShmRing(self._client.config.window + 2, int(image.nbytes), self._config.shm_prefix,
                                        mode=self._config.shm_mode, group=self._config.shm_group)
            log.info("%s: shared-memory ring %s, %d slots of %d bytes", self.camera_id, ring.name, ring.slots,
                     ring.slot_bytes)
        return ring

    def _on_result(self, frame: SourceFrame, result: FrameResult) -> None:
        self.stats.answer(result.status, result.latency_ms)
        if result.status is not FrameStatus.OK:
            self._not_ok(result)
        try:
            if self._on_answer is not None:
                self._on_answer(frame, result)
        finally:
            self._slot.poke()  # the window has room again

    def _not_ok(self, result: FrameResult) -> None:
        """An answer other than OK: why, in the stats' note and the log, once per REPEAT_LOG_S
        for a status that recurs (a camera whose every frame the server refuses)."""
        with self._answer_log_lock:  # a retired session's receiver may still be delivering
            status = result.status.value  # by status: messages name the frame
            again = self._answer_logs.setdefault(status, RepeatedLog()).due(status)
        if again is None:
            return
        why = f"frame {result.sequence} answered {result.status.value}: {result.message or '(no message)'}"
        self.stats.note(why)
        log.warning("%s: %s%s", self.camera_id, why, again)

    def _new_session(self) -> StreamSession:
        session = self._client.stream(self._on_result, self._config.options, name=self.camera_id)
        with self._session_lock:
            self._session = session
        return session

    def _replace(self, session: StreamSession) -> tuple[StreamSession | None, bool]:
        """Retire ``session`` (it gave up on the server) and open the next; whether it first
        waited (the retired one got no answer: backoff). None instead of a session when the
        node stopped meanwhile."""
        reason = str(session.error or "stream ended")
        self.stats.note(f"stream to the server gave up: {reason}")
        if TOO_LARGE_HINT in reason:
            self._limit.forget()  # the server may have restarted with a lower limit: ask it again
        again = self._replaced_log.due(reason)
        if again is None:
            log.debug("%s: %s; %d frames lost, opening a new stream", self.camera_id, reason, len(session.lost))
        else:
            log.error("%s: %s; %d frames lost, opening a new stream%s", self.camera_id, reason, len(session.lost),
                      again)
        self._retire(session)
        answered = self.stats.answered  # one int read: needs no lock
        waited = answered <= self._answered_before
        if waited:
            # Frames captured meanwhile are overwritten in the mailbox (counted dropped).
            self._stop.wait(self._replace_backoff.next_delay() or self._retry.max_s)
        else:
            self._replace_backoff.reset()  # that stream served: the next one starts at once
        self._answered_before = answered
        if self._stop.is_set():
            return None, waited
        return self._new_session(), waited

    def _retire(self, session: StreamSession) -> None:
        session.abort()
        session.join(self._config.stop_timeout_s)
        self.stats.count("lost", len(session.lost))
        with self._session_lock:
            self._past_server_reconnects += session.reconnects
            if self._session is session:
                self._session = None

    def _finish(self, session: StreamSession) -> None:
        try:
            session.close(self._config.stop_timeout_s)
        except PerceptionError as exc:
            log.warning("%s: at stop: %s", self.camera_id, exc)
        self._retire(session)
        if self._ring is not None:
            self._ring.close()
            self._ring = None


class CameraNode:
    """Every camera of a node; ``start()``, then ``stop()`` (also from a signal handler's
    event) and read ``summaries()``."""

    def __init__(
        self,
        cameras: list[tuple[str, Camera]],
        client: DetectorClient,
        config: NodeConfig,
        on_answer: ResultCallback | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        ids = [cid for cid, _ in cameras]
        dupes = sorted({c for c in ids if ids.count(c) > 1})
        if dupes:
            raise ConfigError(f"camera id {dupes[0]!r} is used twice; give each source its own --camera-id")
        if not cameras:
            raise ConfigError("no camera given")
        self.stop_event = stop or threading.Event()
        limit = MessageLimit(client, config.options)  # the server is asked once for the node
        self.workers = [CameraWorker(cid, cam, client, config, self.stop_event, on_answer, limit)
                        for cid, cam in cameras]
        self._config = config

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self) -> None:
        """Stop capturing, wait (bounded) for the answers in flight, end every thread."""
        self.stop_event.set()
        # One deadline for the node: each stuck camera took the whole timeout in turn (12 s for
        # three, past a container runtime's 10 s before SIGKILL and the lost summary).
        timeout = self._config.stop_timeout_s + 2 * _POLL_S + 1.0
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.join(timeout, deadline)

    @property
    def stuck(self) -> bool:
        """After ``stop``: a camera's thread is still inside a native call (an open or a read
        the camera never answers, bounded only by its own timeout)."""
        return any(w.busy for w in self.workers)

    def summaries(self) -> list[CameraSummary]:
        return [w.summary() for w in self.workers]

    def wait(self, every_s: float, tick: Callable[[list[CameraSummary]], None], duration_s: float = 0.0) -> None:
        """Block until ``stop_event`` is set (or ``duration_s`` passed, 0 = no limit), calling
        ``tick`` every ``every_s`` seconds (0 = never)."""
        start = time.monotonic()
        next_tick = start + every_s
        # Short waits: a signal handler in this (main) thread sets the event between them.
        while not self.stop_event.wait(_POLL_S):
            now = time.monotonic()
            if duration_s and now - start >= duration_s:
                return
            if every_s > 0 and now >= next_tick:
                next_tick = now + every_s
                tick(self.summaries())
