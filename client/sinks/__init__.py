"""Where replay results go: JSONL, COCO results, an annotated video. Each sink has
``write(frame, result)`` and ``close()``; files are valid after every write (JSONL) or are
written whole through a temporary file and a rename (JSON)."""

from __future__ import annotations

from typing import Protocol

from client.frames import FrameResult, SourceFrame


class Sink(Protocol):
    def write(self, frame: SourceFrame, result: FrameResult) -> None: ...

    def close(self) -> None: ...
