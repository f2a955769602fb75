"""Exponential backoff with jitter for reconnects, bounded in time and / or attempts."""

from __future__ import annotations

import random

from client.config import BackoffConfig


class Backoff:
    """Delay sequence for one streak of consecutive failures; ``reset()`` after a success.

    ``next_delay(now)`` returns seconds, or None once the streak has to end: ``max_attempts``
    failures happened, or ``give_up_after_s`` passed since the streak's first failure. A delay
    never reaches past that deadline, so the last attempt is made right at it. ``now`` is the
    caller's clock in seconds (any monotonic clock, the same on every call); without it only
    ``max_attempts`` bounds the streak.
    """

    def __init__(self, config: BackoffConfig, rng: random.Random | None = None) -> None:
        self._config = config
        self._rng = rng or random.Random()
        self.attempts = 0
        self._ceiling = config.initial_s  # the next delay's upper bound before jitter
        self._streak_start: float | None = None

    def reset(self) -> None:
        self.attempts = 0
        self._ceiling = self._config.initial_s
        self._streak_start = None

    def streak_s(self, now: float) -> float:
        """Seconds since the first failure of the current streak (0 without one)."""
        return 0.0 if self._streak_start is None else max(0.0, now - self._streak_start)

    def next_delay(self, now: float | None = None) -> float | None:
        c = self._config
        if now is not None and self._streak_start is None:
            self._streak_start = now
        if c.max_attempts and self.attempts >= c.max_attempts:
            return None
        left: float | None = None
        if c.give_up_after_s and now is not None:
            left = c.give_up_after_s - self.streak_s(now)
            if left <= 0:
                return None
        # Grown and capped one step at a time: ``initial_s * multiplier**attempts`` raised
        # OverflowError from the 1024th attempt at 2.0, and a camera node retries for ever.
        ceiling = self._ceiling
        self._ceiling = min(c.max_s, ceiling * c.multiplier)
        self.attempts += 1
        delay = ceiling * (1.0 - c.jitter * self._rng.random())
        return delay if left is None else min(delay, left)
