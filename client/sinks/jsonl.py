"""JSON Lines of answered frames: one object per line, flushed per line, so a replay that
stops at any point leaves a file whose every line is complete."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from client.frames import FrameResult, SourceFrame
from perception.errors import DataError


class JsonlSink:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w", buffering=1)  # noqa: SIM115 - held until close(), not one block
        except OSError as exc:
            raise DataError(f"{self.path}: cannot write: {exc.strerror}") from exc
        self.lines = 0

    def write(self, frame: SourceFrame, result: FrameResult) -> None:
        # One write() call per complete line: no reader (or crash) sees half a record.
        line = json.dumps(result.to_json_dict(), separators=(",", ":")) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()
            self.lines += 1

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.close()


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a replay JSONL; a malformed line is a DataError naming file and line, except
    an incomplete last line (the writer was killed mid-line), which is skipped."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: cannot read: {exc}") from exc
    lines = text.split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):  # no trailing newline: a torn final line
                return
            raise DataError(f"{p}:{i}: malformed JSON: {exc.msg}") from exc
        if not isinstance(rec, dict) or "camera_id" not in rec or "sequence" not in rec:
            raise DataError(f"{p}:{i}: not a replay record (needs camera_id and sequence)")
        yield i, rec


def load_results(path: str | os.PathLike[str]) -> list[FrameResult]:
    """Every record of a replay JSONL as a FrameResult; DataError names file:line of a bad one."""
    out = []
    for i, rec in read_jsonl(path):
        try:
            out.append(FrameResult.from_json_dict(rec))
        except (DataError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise DataError(f"{path}:{i}: malformed replay record ({type(exc).__name__}: {exc})") from exc
    return out
