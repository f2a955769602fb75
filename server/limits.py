"""Budgets that keep the server bounded in bytes, threads and streams, whatever clients send.

- ``ByteBudget``: undecoded request bytes held at once, globally and per stream. A frame that
  does not fit is answered OVERLOADED at once and its bytes released: memory is bounded by
  bytes, not by a frame count that a new camera id per frame would get around.
- ``DecodeSlots``: one bound on concurrent decodes for all streams, sized to the cores, so 32
  streams cannot run 32 full-size decodes (and their buffers) at once.
- ``StreamAdmission``: open ``StreamDetect`` calls, globally and per peer. Health and model
  info are unary calls outside this cap, so idle streams can never lock out a liveness probe.
- ``CallSlots``: unary ``Detect`` calls at once. They share the handler pool with health, model
  info and reflection (``max_streams + max_workers`` threads); capped below ``max_workers``, slow
  ones cannot take every thread and starve a liveness probe.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

from perception.errors import OverloadedError
from server.runtime.settings import usable_cores


class ByteBudget:
    """A counter of bytes held, with a hard limit. Thread-safe."""

    def __init__(self, limit: int, name: str) -> None:
        if limit < 1:
            raise ValueError(f"{name}: byte budget must be positive, got {limit}")
        self.limit = limit
        self.name = name
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def try_take(self, n: int) -> bool:
        with self._lock:
            if self._used + n > self.limit:
                return False
            self._used += n
            return True

    def give_back(self, n: int) -> None:
        with self._lock:
            self._used = max(0, self._used - n)


def take_both(first: ByteBudget, second: ByteBudget, n: int) -> str:
    """Take ``n`` bytes from both budgets, or neither; '' on success, else which one is full."""
    if not first.try_take(n):
        return first.name
    if not second.try_take(n):
        first.give_back(n)
        return second.name
    return ""


class DecodeSlots:
    """At most ``count`` decodes at once across every stream and unary call, shared fairly.

    A free slot goes to the waiting owner (a stream) that has used the least decode time
    recently (an exponentially decaying sum, half-life ``half_life_s``), so a stream of costly
    frames (progressive 4K JPEGs, corrupt data the decoder chews on) cannot take the slots from
    cameras whose frames decode in milliseconds: it waits behind them instead.

    A slot is handed over directly: the thread that frees it wakes exactly the waiter it goes
    to, instead of waking every waiting stream (up to ``max_streams`` of them) to compare.

    Waiters are ordered by ``log2(recent cost) + arrival / half-life``: every owner's cost decays
    at the same rate, so this orders them as their decayed costs compare at any later moment,
    once, in the heap. Ordered by the cost at arrival, a waiter whose last decode was costly
    kept that key while newcomers' fresh, smaller costs went ahead of it for as long as the
    slots stayed busy: a stream starved for the whole overload (10 s in a review's run).
    """

    def __init__(self, count: int = 0, half_life_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # the clock: seconds (injected by tests)
        self.count = count or usable_cores()
        self._clock = clock
        self._free = self.count
        self._lock = threading.Lock()
        # (decay-invariant cost key, arrival, owner, the waiter's own lock): a heap, least cost first.
        self._waiting: list[tuple[float, int, Hashable, threading.Lock]] = []
        self._cost: dict[Hashable, tuple[float, float]] = {}  # owner -> (cost s, when)
        self._arrivals = itertools.count()
        self._half_life_s = half_life_s

    def _recent(self, owner: Hashable, now: float) -> float:
        cost, when = self._cost.get(owner, (0.0, now))
        return cost * 0.5 ** ((now - when) / self._half_life_s)

    def _key(self, owner: Hashable, now: float) -> float:
        """Orders owners as their decayed costs will compare at any later time (see the class):
        c1 * 2**(-(t - t1) / h) < c2 * 2**(-(t - t2) / h)  <=>  log2(c1) + t1 / h < log2(c2) + t2 / h.
        An owner with no recent cost goes first (FIFO among such)."""
        recent = self._recent(owner, now)
        return math.log2(recent) + now / self._half_life_s if recent > 0 else -math.inf

    @contextmanager
    def slot(self, owner: Hashable = None) -> Iterator[None]:
        with self._lock:
            if self._free > 0 and not self._waiting:
                self._free -= 1
                handed = None
            else:
                handed = threading.Lock()
                handed.acquire()
                now = self._clock()
                heapq.heappush(self._waiting, (self._key(owner, now), next(self._arrivals), owner, handed))
        if handed is not None:
            handed.acquire()  # released by the thread that hands this waiter its slot
        t0 = self._clock()
        try:
            yield
        finally:
            with self._lock:
                now = self._clock()
                self._cost[owner] = (self._recent(owner, now) + (now - t0), now)
                if len(self._cost) > 4096:  # owners come and go (streams): forget the stale ones
                    for k in [k for k, (_, w) in self._cost.items() if now - w > 10 * self._half_life_s]:
                        del self._cost[k]
                if self._waiting:
                    heapq.heappop(self._waiting)[3].release()  # the slot passes on, still taken
                else:
                    self._free += 1


class StreamAdmission:
    """Open streams, globally and per peer (the client's address without its port)."""

    def __init__(self, max_streams: int, max_per_peer: int) -> None:
        if max_streams < 1 or max_per_peer < 1:
            raise ValueError("stream limits must be positive")
        self.max_streams = max_streams
        self.max_per_peer = max_per_peer
        self._open: dict[str, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    @staticmethod
    def host_of(peer: str) -> str:
        """``ipv4:10.0.0.5:4242`` / ``ipv6:[::1]:4242`` -> the address without the port."""
        addr = peer.split(":", 1)[1] if ":" in peer else peer
        return addr.rsplit(":", 1)[0] if addr.count(":") >= 1 else addr

    def admit(self, peer: str) -> str:
        """Count a new stream of ``peer``; OverloadedError when a cap is reached. Returns the key
        to ``release`` with."""
        host = self.host_of(peer)
        with self._lock:
            if self._total >= self.max_streams:
                raise OverloadedError(f"server has {self._total} streams open (max {self.max_streams}); retry later")
            if self._open.get(host, 0) >= self.max_per_peer:
                raise OverloadedError(f"{host} has {self._open[host]} streams open (max {self.max_per_peer} per peer)")
            self._open[host] = self._open.get(host, 0) + 1
            self._total += 1
        return host

    def hold(self, context: Any, on_start: Callable[[], None], on_end: Callable[[], None]) -> bool:
        """Admit a stream of the call ``context`` (a grpc.ServicerContext; OverloadedError when
        a cap is reached), then ``on_start``; once the call ends, however it ends, ``on_end``
        (the stream's own clean-up) and the slot is given back. False if the call had already
        ended (all of them have run then): nothing to serve."""
        peer = self.admit(context.peer())
        on_start()
        released = threading.Event()

        def ended() -> None:  # once, when the call ends
            try:
                on_end()
            finally:
                if not released.is_set():
                    released.set()
                    self.release(peer)

        if not context.add_callback(ended):
            ended()
            return False
        return True

    def release(self, host: str) -> None:
        with self._lock:
            n = self._open.get(host, 0) - 1
            if n > 0:
                self._open[host] = n
            else:
                self._open.pop(host, None)
            self._total = max(0, self._total - 1)

    @property
    def open_streams(self) -> int:
        with self._lock:
            return self._total


class CallSlots:
    """At most ``limit`` calls at once; one past it is refused at once (OverloadedError, answered
    RESOURCE_EXHAUSTED) rather than queued: a queued call would hold a handler thread while it
    waits, which is what the cap is there to leave free. Thread-safe."""

    def __init__(self, limit: int, what: str) -> None:
        if limit < 1:
            raise ValueError(f"{what}: the call limit must be positive, got {limit}")
        self.limit = limit
        self.what = what
        self._in_use = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._in_use

    @contextmanager
    def hold(self, stream: str = "StreamDetect") -> Iterator[None]:
        """A slot for the call; ``stream``: the streaming method the caller's protocol has
        (a KServe client has no StreamDetect), named in the refusal."""
        with self._lock:
            if self._in_use >= self.limit:
                raise OverloadedError(f"server has {self._in_use} {self.what} calls in progress (max {self.limit}); "
                                      f"retry later, or send frames on a {stream} stream")
            self._in_use += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use -= 1


class InvalidBackoff:
    """How long a stream's reader waits before taking its next request, after frames that
    cannot be served (undecodable, over the size limits, malformed options).

    Each such frame triples the stream's strikes plus one and imposes a wait of ``STEP_S`` per
    strike, at most ``max_s``; each frame served halves the strikes (and imposes nothing). A
    camera with an occasional corrupt frame waits 5 ms once; a stream of garbage is read at one
    request per ``max_s`` after six, so its bytes wait in the client (HTTP/2 flow control)
    instead of costing the server a receive, a parse and a decode attempt each. Good frames
    mixed in do not undo it: one bad frame adds more strikes than one good frame forgives.
    ``max_s`` 0 turns it off. Not thread-safe: the stream's lock guards it.
    """

    STEP_S = 0.005

    def __init__(self, max_s: float = 1.0) -> None:
        self.max_s = max_s
        self.strikes = 0.0
        self.until = 0.0  # monotonic time before which the reader takes no request

    def invalid(self, now: float) -> float:
        """Count a frame that could not be served; returns the wait it imposes."""
        if self.max_s <= 0:
            return 0.0
        self.strikes = min(self.strikes * 3 + 1, self.max_s / self.STEP_S)
        wait = min(self.max_s, self.STEP_S * self.strikes)
        self.until = max(self.until, now + wait)
        return wait

    def served(self) -> None:
        self.strikes /= 2


# Unary Detect calls at once by default: the default max_workers (16) less a quarter of them,
# left for health checks, model info and reflection (ServerConfig.unary_detect_limit).
DEFAULT_MAX_UNARY_DETECT_CALLS = 12
# Distinct camera ids one stream may carry: a vehicle has a few dozen cameras at most, and a
# stream remembers each one it carried until it ends (server.stream).
DEFAULT_MAX_STREAM_CAMERAS = 64


class ServiceLimits:
    """Every budget one server's calls share, built once from the config."""

    def __init__(self, max_undecoded_bytes: int = 256 << 20, max_stream_undecoded_bytes: int = 64 << 20,
                 decode_threads: int = 0, max_streams: int = 32, max_streams_per_peer: int = 8,
                 stream_idle_timeout_s: float = 60.0, priorities: dict[str, int] | None = None,
                 invalid_backoff_max_s: float = 1.0, stream_inflight_bytes: int = 4 << 20,
                 max_unary_detect_calls: int = DEFAULT_MAX_UNARY_DETECT_CALLS,
                 max_stream_cameras: int = DEFAULT_MAX_STREAM_CAMERAS) -> None:
        if max_stream_cameras < 1:
            raise ValueError(f"max_stream_cameras must be positive, got {max_stream_cameras}")
        self.undecoded = ByteBudget(max_undecoded_bytes, "the server's undecoded-bytes budget")
        self.stream_undecoded_bytes = max_stream_undecoded_bytes
        self.stream_inflight_bytes = stream_inflight_bytes
        self.decode = DecodeSlots(decode_threads)
        self.streams = StreamAdmission(max_streams, max_streams_per_peer)
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self.priorities = dict(priorities or {})
        self.invalid_backoff_max_s = invalid_backoff_max_s
        self.unary_detect = CallSlots(max_unary_detect_calls, "unary Detect and ModelInfer")
        self.max_stream_cameras = max_stream_cameras

    def priority_of(self, camera_id: str) -> int:
        """The camera's priority class (unlisted cameras are normal: 1)."""
        return self.priorities.get(camera_id, 1)

    def stream_budget(self) -> ByteBudget:
        return ByteBudget(self.stream_undecoded_bytes, "this stream's undecoded-bytes budget")
