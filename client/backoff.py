"""Exponential backoff with jitter for reconnects."""

from __future__ import annotations

import random

from client.config import BackoffConfig


class Backoff:
    """Delay sequence for consecutive failures; ``reset()`` after a success.

    ``next_delay()`` returns seconds, or None once ``max_attempts`` failures happened.
    """

    def __init__(self, config: BackoffConfig, rng: random.Random | None = None) -> None:
        self._config = config
        self._rng = rng or random.Random()
        self.attempts = 0

    def reset(self) -> None:
        self.attempts = 0

    def next_delay(self) -> float | None:
        c = self._config
        if c.max_attempts and self.attempts >= c.max_attempts:
            return None
        ceiling = min(c.max_s, c.initial_s * c.multiplier**self.attempts)
        self.attempts += 1
        return ceiling * (1.0 - c.jitter * self._rng.random())
