"""Image folders: sorted files of one camera, or one sub-folder per camera.

Files play in name order, numbers in names compared as numbers: ``ffmpeg -i drive.mp4 %d.jpg``
writes 1.jpg ... 10.jpg unpadded, which sorted as text would play 1, 10, 11, ..., 2.
Timestamps come from a timestamps file (one integer nanoseconds per line in that order, or
"<file name> <ns>" per line) or, without one, from ``fps``. JPEG and PNG files go
as-is; other formats are decoded and sent raw.
"""

from __future__ import annotations

import heapq
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from client.frames import SourceFrame
from client.sources.base import IMAGE_SUFFIXES, SourceOptions
from client.sources.images import bgr_frame, is_encoded_image
from perception.errors import DataError

log = logging.getLogger(__name__)


def _images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda p: _name_order(p.name))


def _name_order(name: str) -> tuple[tuple[int, str], ...]:
    """Sort key: the name's runs of digits by value (ties by the text: 01 before 1), the rest as text."""
    return tuple((int(part), part) if part.isdigit() else (-1, part) for part in re.split(r"(\d+)", name))


def read_timestamps(path: Path, files: list[Path]) -> list[int]:
    """Timestamps (ns) for ``files`` from ``path``; raises DataError on a mismatch."""
    try:
        lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read timestamps file: {exc}") from exc
    try:
        if lines and all(len(ln) == 1 for ln in lines):
            values = [int(ln[0]) for ln in lines]
            if len(values) < len(files):
                raise DataError(f"{path}: {len(values)} timestamps for {len(files)} images")
            return values[: len(files)]
        by_name = {ln[0]: int(ln[1]) for ln in lines if len(ln) >= 2}
    except ValueError as exc:
        raise DataError(f"{path}: timestamps must be integer nanoseconds: {exc}") from exc
    out = []
    for f in files:
        key = f.name if f.name in by_name else f"{f.parent.name}/{f.name}"
        if key not in by_name:
            raise DataError(f"{path}: no timestamp for {f.name}")
        out.append(by_name[key])
    return out


class FolderSource:
    def __init__(self, path: Path, options: SourceOptions) -> None:
        self.path = Path(path)
        self._opts = options
        top = _images(self.path)
        self.cameras: dict[str, list[Path]] = {}
        if top:
            self.cameras[options.camera or self.path.name] = top
        else:
            for sub in sorted(p for p in self.path.iterdir() if p.is_dir()):
                imgs = _images(sub)
                if imgs:
                    self.cameras[sub.name] = imgs
        if not self.cameras:
            raise DataError(f"{self.path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder or its sub-folders")
        self._stamps: dict[str, list[int]] = {}
        ts_file = options.timestamps or (self.path / "timestamps.txt")
        for cam, files in self.cameras.items():
            own = files[0].parent / "timestamps.txt"
            if options.timestamps is None and own.is_file():
                self._stamps[cam] = read_timestamps(own, files)
            elif ts_file.is_file():
                self._stamps[cam] = read_timestamps(Path(ts_file), files)
            elif options.timestamps is not None:
                raise DataError(f"{ts_file}: timestamps file not found")
            else:
                period = 1e9 / options.fps
                self._stamps[cam] = [int(round(i * period)) for i in range(len(files))]

    def describe(self) -> str:
        cams = ", ".join(f"{c} ({len(f)})" for c, f in self.cameras.items())
        return f"image folder {self.path}: cameras {cams}"

    def _camera_frames(self, cam: str) -> Iterator[SourceFrame]:
        for seq, (f, ts) in enumerate(zip(self.cameras[cam], self._stamps[cam], strict=True)):
            rel = f.relative_to(self.path).as_posix()
            try:
                data = f.read_bytes()
            except OSError as exc:
                raise DataError(f"{f}: cannot read: {exc.strerror}") from exc
            if is_encoded_image(data):
                yield SourceFrame(cam, seq, ts, encoded=data, file_name=rel)
                continue
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
            if img is None:
                raise DataError(f"{f}: not a readable image")
            yield bgr_frame(cam, seq, ts, img, file_name=rel)

    def __iter__(self) -> Iterator[SourceFrame]:
        streams = [self._camera_frames(c) for c in self.cameras]
        yield from heapq.merge(*streams, key=lambda fr: fr.timestamp_ns)
