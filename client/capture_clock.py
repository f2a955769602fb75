"""Capture timestamps of a live camera in epoch nanoseconds.

A stream's own clock (OpenCV's ``CAP_PROP_POS_MSEC``: the V4L2 buffer time, the RTP / container
time of a network stream) says when a frame was taken better than the moment the host got to
read it. It is mapped to epoch time once, at the first frame, and used while it keeps pace
with the host's monotonic clock. Some streams have no usable clock: MJPEG over HTTP gets a
time invented from an assumed 25 fps, which drifts from the real rate. Such a clock (zero
after it started, going backwards, or drifting more than ``max_drift_ns`` from the host) is dropped for the host
monotonic clock, itself mapped to epoch once, so timestamps never jump with NTP steps.

One clock stamps every connection to a camera: a reconnect maps the new stream's clock anew,
but the stamps go on from the last one. A stream clock runs up to ``max_drift_ns`` ahead of
the host's, so the first stamps of a new connection could fall before the last of the old one,
and the server's tracker takes a capture time going backwards for a camera restart (it drops
every track of the camera). Until the new clock catches up with the last stamp, frames are
stamped after it at ``SLEW`` (0.9) times their spacing on the new clock: every frame one
nanosecond after the last, as they were, squeezed a second of frames onto one instant, and a
tracker stepping them saw a car stand still, then jump (4 track ids for one car).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# How far a stream clock may wander from the host clock before it is no longer believed. Not a
# measurement: larger than the buffering of a healthy stream (well under a second), far smaller
# than the drift of an invented 25 fps clock over a minute of a 10 fps stream (36 s).
MAX_DRIFT_NS = 1_000_000_000
# While the stamps are ahead of the clock that makes them (after a reconnect, or a stream clock
# that ran ahead and was dropped), each frame advances by this share of its spacing on that
# clock: the stamps keep nearly the frames' spacing and meet the clock after ten times the lead
# (10 s for the largest, 1 s). A policy, not a measurement.
SLEW = 0.9


class CaptureClock:
    """Stamps the frames of one camera, across its connections (``reconnected()``)."""

    def __init__(
        self,
        max_drift_ns: int = MAX_DRIFT_NS,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        epoch_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._max_drift_ns = max_drift_ns
        self._monotonic_ns = monotonic_ns
        self._host_offset = epoch_ns() - monotonic_ns()  # monotonic -> epoch, mapped once
        self._stream_offset: int | None = None  # stream clock -> epoch, mapped at the first frame
        self._last_stream_ns = -1
        self._last_stamp = 0
        self._last_clock: int | None = None  # the last frame's time on the clock now stamping; None after a switch
        self._last_host = 0  # when the last frame was stamped (host clock)
        self.uses_stream_clock = True

    def reconnected(self) -> None:
        """A new connection to the camera: its stream clock is mapped at its first frame and
        believed again; the stamps stay after the last one of the connection before."""
        self._stream_offset = None
        self._last_stream_ns = -1
        self._last_clock = None
        self.uses_stream_clock = True

    def host_now(self) -> int:
        """The host's monotonic clock in epoch nanoseconds."""
        return self._monotonic_ns() + self._host_offset

    def stamp(self, stream_ms: float, where: str = "camera") -> int:
        """The capture time of a frame the stream stamped ``stream_ms`` (0 = no stamp)."""
        was_stream = self.uses_stream_clock
        stamped = self._stamp(stream_ms, where)
        host = self.host_now()
        if was_stream != self.uses_stream_clock:
            self._last_clock = None  # dropped the stream clock for the host's: another clock
        # Never backwards, also when the stream clock was ahead of the host's and is dropped:
        # at least nearly the frame's spacing on the clock now stamping after the last stamp (the
        # host's time since the last frame, just after a switch of clocks). On a clock not behind
        # the stamps, that is the clock's own time.
        since = stamped - self._last_clock if self._last_clock is not None else host - self._last_host
        out = max(stamped, self._last_stamp + max(1, int(SLEW * since)))
        self._last_stamp, self._last_clock, self._last_host = out, stamped, host
        return out

    def _stamp(self, stream_ms: float, where: str) -> int:
        host = self.host_now()
        if not self.uses_stream_clock:
            return host
        stream_ns = int(round(stream_ms * 1e6))
        if stream_ns <= 0 and self._stream_offset is None:
            return host  # streams stamp their first frames 0 (RTSP: until the first RTCP sync)
        if stream_ns <= 0 or stream_ns < self._last_stream_ns:
            return self._give_up(host, where, "no stream clock" if stream_ns <= 0 else "stream clock went backwards")
        if self._stream_offset is None:
            self._stream_offset = host - stream_ns
        stamped = stream_ns + self._stream_offset
        if abs(stamped - host) > self._max_drift_ns:
            return self._give_up(host, where, f"stream clock drifted {(stamped - host) / 1e9:+.2f} s from the host's")
        self._last_stream_ns = stream_ns
        return stamped

    def _give_up(self, host: int, where: str, why: str) -> int:
        self.uses_stream_clock = False
        # A stream without a clock is normal (some HTTP cameras), only worth a debug line.
        level = logging.DEBUG if self._stream_offset is None else logging.INFO
        log.log(level, "%s: %s; stamping frames with the host clock", where, why)
        return host
