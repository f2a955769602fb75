"""JSON Lines of a replay: one object per line and one line per frame: the server's answer, or
a client status with a reason (``client_status``) for a frame the server never answered.

Whole lines only: each record is encoded first and handed to the kernel as one complete line
in one ``os.write`` on an unbuffered descriptor, so nothing waits in a user-space buffer and a
process that crashes or is killed between two writes leaves only whole lines. A write the
kernel takes only in part (disk full, a file size limit) is cut back to the last whole line
before the error is raised. One case is beyond any writer: Linux may stop a write at a page
boundary for a SIGKILL that arrives during it, so a line crossing a page can, very rarely, be
torn; it is then the last line, and ``read_jsonl`` skips a torn last line. Not synced per line:
surviving a power loss is not the aim (``close()`` syncs once).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from client.client_status import CLIENT_STATUS_NAMES, Unanswered
from client.frames import FrameResult, SourceFrame
from perception.errors import DataError


class JsonlSink:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND: after a torn write is cut back, the next line starts where it began.
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
        except OSError as exc:
            raise DataError(f"{self.path}: cannot write: {exc.strerror}") from exc
        self.lines = 0

    def write(self, frame: SourceFrame, result: FrameResult) -> None:
        self._write_line(result.to_json_dict())

    def write_unanswered(self, record: Unanswered) -> None:
        self._write_line(record.to_json_dict())

    def _write_line(self, record: dict[str, object]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            fd = self._fd
            if fd is None:
                raise DataError(f"{self.path}: write after close")
            written = 0
            try:
                while written < len(line):  # one write() unless the kernel takes only part of it
                    written += os.write(fd, line[written:])
            except OSError as exc:
                if written:
                    _cut_back(fd, written)
                raise DataError(f"{self.path}: cannot write: {exc.strerror}") from exc
            self.lines += 1

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            except OSError:
                pass  # a file system without fsync (a pipe, some FUSE mounts): the lines are written
            finally:
                os.close(fd)

    def discard(self) -> None:
        """Close, for a replay that never started. Opening emptied the file already, which cannot
        be undone: that is why the replay CLI opens ``--out`` after its other outputs."""
        self.close()


def _cut_back(fd: int, torn: int) -> None:
    """Remove the last ``torn`` bytes of ``fd``: the start of a line that could not be written whole."""
    # If even this fails, the reader skips a torn final line (read_jsonl); the write error is raised anyway.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, os.fstat(fd).st_size - torn)


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


def is_client_status_record(rec: dict[str, Any]) -> bool:
    """Whether a JSONL record is a frame the server never answered (a client status)."""
    return rec.get("status") in CLIENT_STATUS_NAMES


def load_results(path: str | os.PathLike[str]) -> list[FrameResult]:
    """Every answer of a replay JSONL as a FrameResult, in file order; records of frames the
    server never answered (client statuses) are not answers and are left out. DataError names
    file:line of a bad record."""
    out = []
    for i, rec in read_jsonl(path):
        if is_client_status_record(rec):
            continue
        try:
            out.append(FrameResult.from_json_dict(rec))
        except (DataError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise DataError(f"{path}:{i}: malformed replay record ({type(exc).__name__}: {exc})") from exc
    return out
