"""Files written whole or not at all: a temporary file in the same directory, fsync, then
rename over the target (JSON here; ``temp_beside`` for the MCAP output too)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from perception.errors import DataError


def temp_beside(p: Path) -> tuple[int, str]:
    """A new temporary file in ``p``'s directory, to be renamed over ``p``: (fd, its path).
    Made with the mode a file opened for writing gets (0666 less the umask, as the JSONL output
    has): ``mkstemp``'s 0600 went with the rename, and a result on a shared volume (a replay
    Job's /results) could not be read by anyone else."""
    for _ in range(100):
        tmp = p.parent / f".{p.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {p}")


def write_json_atomic(path: str | os.PathLike[str], data: Any, indent: int | None = 2) -> Path:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_beside(p)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=indent)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise DataError(f"{p}: cannot write: {exc.strerror or exc}") from exc
    return p
