"""Video files (MP4, AVI, ...) through OpenCV: one camera, timestamps from the frame rate."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterator
from pathlib import Path

import cv2

from client.frames import SourceFrame
from client.sources.base import SourceOptions
from client.sources.images import bgr_frame
from perception.errors import DataError

log = logging.getLogger(__name__)


class VideoSource:
    """Decoded frames of one video; capture time = frame index / fps (ns from 0).

    Frames leave as raw BGR pixels, or re-encoded as JPEG with ``encode="jpeg"`` to save
    bandwidth when the server is on another machine.
    """

    def __init__(self, path: Path, options: SourceOptions) -> None:
        self.path = Path(path)
        self._opts = options
        self.camera_id = options.camera or self.path.stem
        cap = self._open()
        self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if not self.fps or self.fps != self.fps or self.fps > 1000:
            self.fps = options.fps
        self.frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        cap.release()

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise DataError(f"{self.path}: cannot open video (unreadable, truncated or unsupported codec)")
        return cap

    def describe(self) -> str:
        return (
            f"video {self.path.name}: camera {self.camera_id!r}, {self.width}x{self.height}, "
            f"{self.frame_count} frames at {self.fps:.2f} fps"
        )

    def __iter__(self) -> Iterator[SourceFrame]:
        cap = self._open()
        period_ns = 1e9 / self.fps
        index = 0
        try:
            while True:
                ok, img = cap.read()
                if not ok or img is None:
                    break
                ts = int(round(index * period_ns))
                if self._opts.encode == "jpeg":
                    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, self._opts.jpeg_quality])
                    if not ok:
                        raise DataError(f"{self.path}: frame {index} could not be JPEG-encoded")
                    yield SourceFrame(self.camera_id, index, ts, encoded=buf.tobytes())
                else:
                    yield bgr_frame(self.camera_id, index, ts, img)
                index += 1
        finally:
            cap.release()
        if index == 0:
            raise DataError(f"{self.path}: no frame could be decoded (truncated or corrupt)")
        # Container frame counts are estimates for some codecs; only a large gap means damage.
        if self.frame_count and index < self.frame_count - 2:
            raise DataError(f"{self.path}: truncated: decoded {index} of {self.frame_count} frames")


class VideoFolderSource:
    """A folder of videos, one per camera (``front.mp4``, ``rear.mp4``): replayed together,
    merged by timestamp (every video's clock starts at 0)."""

    def __init__(self, path: Path, options: SourceOptions, files: list[Path]) -> None:
        self.path = Path(path)
        if options.camera:
            raise DataError(
                f"{self.path}: --camera applies to a single video; camera ids come from the file names here"
            )
        by_camera: dict[str, list[str]] = {}
        for f in files:
            by_camera.setdefault(f.stem, []).append(f.name)
        # Two videos of one camera id interleave one camera's sequences: the second frame 0 found
        # the first still in flight, and one of them ended without a record.
        same = next((names for names in by_camera.values() if len(names) > 1), None)
        if same:
            raise DataError(f"{self.path}: {' and '.join(same)} would both be camera {Path(same[0]).stem!r}: "
                            "keep one video per camera in the folder")
        self.videos = [VideoSource(f, options) for f in files]
        self.fps = max(v.fps for v in self.videos)
        self.frame_count = sum(v.frame_count for v in self.videos)

    def describe(self) -> str:
        return f"video folder {self.path}: " + "; ".join(v.describe() for v in self.videos)

    def __iter__(self) -> Iterator[SourceFrame]:
        yield from heapq.merge(*self.videos, key=lambda f: (f.timestamp_ns, f.camera_id))
