"""The changes of the model served, told to the change hook in their order, outside the host's locks.

The host records a change (``ChangeQueue.record``) under its own lock, in the same hold as the
change itself, so the queue's order is the order of the changes; and delivers it
(``ChangeQueue.deliver``) once it holds none of its locks, in a ``finally``: whatever fails
between the two, the change is delivered.

Invariants:

- One thread delivers at a time, every change queued, in order, until none is left: the first
  to find no thread delivering. The others wait for their own change to be delivered.
- The caller of a change returns once its hook ran, and gets that hook's exception (as when
  hooks ran in the caller's thread), even when another thread ran it. So a slow hook delays
  no change of model (each is made under the host's lock at once), but it delays the callers
  of the changes queued behind it.
- A hook may call back into the host: the change it makes is delivered after the hook returns
  (by the same thread, which must not wait for it: it would wait for itself), and that
  change's hook exception is logged, its caller having returned. A hook must not wait for
  another thread's change: that thread waits for the hook.
- A change whose model is no longer served when its turn comes is skipped (and counts as
  delivered): the last call made is for the model served.
- No hook's failure stops the delivery of the changes behind it: an exception goes to its
  change's caller; a BaseException (an interrupt of the delivering thread) is raised in that
  thread once the queue is empty.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.served_model import ServedModel

log = logging.getLogger(__name__)

# on_change(model, cause): ``model`` is now served; cause "load" (an operator's load: admin,
# SIGHUP), "degrade" / "recover" (the degrader's moves) or "rollback".
ChangeHook = Callable[[ServedModel, str], None]


@dataclass(eq=False)
class Change:
    """A change of the model served, and its delivery: set once its hook ran or was skipped."""

    model: ServedModel
    cause: str
    delivered: threading.Event = field(default_factory=threading.Event, repr=False)
    error: Exception | None = None  # the hook's, for the change's caller
    awaited: bool = True  # False: made by a hook, whose call returned without waiting for it


class ChangeQueue:
    """The changes not yet given to the hook, and the thread giving them. Thread-safe.

    ``served``: the model served now (looked up for each change when its turn comes)."""

    def __init__(self, hook: ChangeHook | None, served: Callable[[], ServedModel]) -> None:
        self._hook = hook
        self._served = served
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Change] = deque()
        self._deliverer: int | None = None  # the ident of the thread delivering, if one is

    def record(self, model: ServedModel, cause: str) -> Change | None:
        """Under the caller's lock, as the change is made: queue it (None without a hook)."""
        if self._hook is None:
            return None
        change = Change(model, cause)
        with self._cond:
            self._queue.append(change)
        return change

    def deliver(self, change: Change | None) -> None:
        """Outside every lock of the caller: return once ``change`` is delivered, delivering the
        queue if no other thread is; raise its hook's exception. Inside a hook (this thread is
        delivering): return at once, ``change`` is delivered after the hook."""
        if change is None:
            return
        me = threading.get_ident()
        with self._cond:
            if self._deliverer == me:
                change.awaited = False
                return
            while not change.delivered.is_set() and self._deliverer is not None:
                self._cond.wait()
            delivering = not change.delivered.is_set()
            if delivering:
                self._deliverer = me
        if delivering:
            self._deliver_queued()
        if change.error is not None:
            raise change.error

    def _deliver_queued(self) -> None:
        """The delivering thread: every change queued, in order, until none is left."""
        hook = self._hook
        interrupt: BaseException | None = None
        try:
            while True:
                with self._cond:
                    if not self._queue:
                        break
                    change = self._queue.popleft()
                try:
                    if hook is not None and self._served() is change.model:
                        hook(change.model, change.cause)
                except Exception as exc:
                    change.error = exc
                    with self._cond:
                        awaited = change.awaited
                    if not awaited:
                        log.exception("the change hook for %s (%s) failed", change.model.describe(), change.cause)
                except BaseException as exc:  # this thread's, not the change's: raised once the queue is delivered
                    interrupt = interrupt or exc
                finally:
                    with self._cond:
                        change.delivered.set()
                        self._cond.notify_all()
        finally:  # whatever escaped: a waiting thread takes over
            with self._cond:
                self._deliverer = None
                self._cond.notify_all()
        if interrupt is not None:
            raise interrupt
