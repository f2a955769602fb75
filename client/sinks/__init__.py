"""Where replay results go: JSONL, COCO results, an annotated video. Each sink has
``write(frame, result)`` for a server answer, ``write_unanswered(record)`` for a frame the
server never answered (``client_status.Unanswered``) and ``close()``; files are valid after
every write (JSONL: whole lines only) or are written whole through a temporary file and a
rename (JSON). ``discard()`` instead of ``close()`` when the replay never started: nothing is
published over the target."""

from __future__ import annotations

from typing import Protocol

from client.client_status import Unanswered
from client.frames import FrameResult, SourceFrame


class Sink(Protocol):
    def write(self, frame: SourceFrame, result: FrameResult) -> None: ...

    def write_unanswered(self, record: Unanswered) -> None: ...

    def close(self) -> None: ...

    def discard(self) -> None: ...
