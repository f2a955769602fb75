"""A one-frame mailbox between a camera's capture thread and its sender: the newest wins.

The capture thread ``put``s every frame it reads and never waits; a frame nobody took before
the next one arrived is counted in ``overwritten`` and gone. The sender ``take``s the newest
frame once its own condition holds (room in the send window) and can ``poke`` the mailbox
when that condition may have changed. So a slow link or server costs old frames, never a
growing queue, and what is sent is as fresh as the camera allows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestFrame(Generic[T]):
    """Thread-safe single slot; ``put`` never blocks."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self.overwritten = 0

    def put(self, item: T) -> None:
        with self._cond:
            if self._item is not None:
                self.overwritten += 1
            self._item = item
            self._cond.notify_all()

    def poke(self) -> None:
        """Wake a waiting ``take`` to re-check its condition."""
        with self._cond:
            self._cond.notify_all()

    def holds(self) -> bool:
        """Whether a frame is waiting to be taken."""
        with self._cond:
            return self._item is not None

    def take(self, ready: Callable[[], bool], timeout: float) -> T | None:
        """The newest item once one is there and ``ready()`` holds; None after ``timeout``
        seconds. ``ready`` runs under the slot's lock: it must not call back into the slot."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._item is None or not ready():
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            item, self._item = self._item, None
            return item
