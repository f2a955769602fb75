"""Image folders: sorted files of one camera, or one sub-folder per camera.

Files play in name order, numbers in names compared as numbers: ``ffmpeg -i drive.mp4 %d.jpg``
writes 1.jpg ... 10.jpg unpadded, which sorted as text would play 1, 10, 11, ..., 2.
Timestamps come from a timestamps file (one integer nanoseconds per line in that order, as many
lines as images, or "<file name> <ns>" per line) or, without one, from ``fps``. JPEG and PNG
files go as-is; other formats are decoded and sent raw. A file that cannot be decoded (damaged,
empty) is sent as it is, as a damaged JPEG is: the server answers it INVALID with its reason and
the replay goes on.

A folder holds images of one camera, or one sub-folder of images per camera: not both (a stray
preview.jpg beside the camera folders would make the folder one camera of one frame).
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
            if len(values) != len(files):  # more is as wrong as fewer: which lines go with which files?
                raise DataError(f"{path}: {len(values)} timestamps for {len(files)} images (one line per image, "
                                "in file name order; or '<file name> <ns>' lines)")
            return values
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


def _some(names: list[str], n: int = 3) -> str:
    """The first ``n`` of ``names``, and how many more: "a.jpg, b.jpg, c.jpg and 7 more"."""
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _decode(data: bytes) -> np.ndarray | None:
    """BGR pixels of an image file OpenCV reads (BMP, TIFF, WebP, ...), or None."""
    if not data:
        return None
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:  # some decoders raise on a damaged file rather than return None
        return None
    return img if img is not None and img.size else None


class FolderSource:
    def __init__(self, path: Path, options: SourceOptions) -> None:
        self.path = Path(path)
        self._opts = options
        top = _images(self.path)
        folders = sorted(p for p in self.path.iterdir() if p.is_dir())
        subs = {sub.name: imgs for sub in folders if (imgs := _images(sub))}
        if top and subs:
            raise DataError(f"{self.path}: images at the top ({_some([p.name for p in top])}) and camera sub-folders "
                            f"of images ({_some(list(subs))}) both: move the top-level images out, or replay one "
                            "camera's folder")
        self.cameras: dict[str, list[Path]] = {options.camera or self.path.name: top} if top else subs
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
            img = _decode(data)
            if img is None:
                # Sent as it is, as a damaged JPEG is: answered INVALID, with a record naming the
                # file, where raising here ended the replay and the files after it got no record.
                log.warning("%s: %s; sent as it is, for the server to answer INVALID", f,
                            "empty file" if not data else "not an image OpenCV can read")
                yield SourceFrame(cam, seq, ts, encoded=data, file_name=rel)
                continue
            yield bgr_frame(cam, seq, ts, img, file_name=rel)

    def __iter__(self) -> Iterator[SourceFrame]:
        streams = [self._camera_frames(c) for c in self.cameras]
        yield from heapq.merge(*streams, key=lambda fr: fr.timestamp_ns)
