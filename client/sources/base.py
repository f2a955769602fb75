"""The frame-source interface and its options; ``registry.py`` picks the reader for a path.

Every reader imports this module, so it imports none of them: an import cycle would make the
import order matter (tests/client/test_layering.py checks for cycles).

A source yields ``SourceFrame``s of all its cameras merged in capture-timestamp order;
iterating again starts from the beginning (that is how ``--loop`` works). Readers raise
perception.errors.DataError naming the file for anything unreadable or truncated, after
yielding every frame read before the damage.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from client.frames import SourceFrame
from perception.errors import DataError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class FrameSource(Protocol):
    """A recording: ``iter()`` yields frames of every selected camera in timestamp order."""

    path: Path

    def __iter__(self) -> Iterator[SourceFrame]: ...

    def describe(self) -> str:
        """One line for logs: kind, cameras / topics, frame count when known."""
        ...


@dataclass(frozen=True)
class SourceOptions:
    """Reader options from the command line.

    topics: MCAP / bag topics to replay (empty = every image topic).
    camera: camera id for single-camera sources (video, flat image folder); default: the
        file / folder name.
    fps: frame rate assumed where the recording has no timestamps (image folders).
    encode: "raw" sends decoded video frames as raw BGR pixels; "jpeg" re-encodes them
        (only for video, whose frames are never available compressed).
    timestamps: image-folder timestamps file (default: <folder>/timestamps.txt if present).
    """

    topics: tuple[str, ...] = ()
    camera: str = ""
    fps: float = 10.0
    encode: str = "raw"
    jpeg_quality: int = 90
    timestamps: Path | None = None

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise DataError(f"fps must be positive, got {self.fps}")
        if self.encode not in ("raw", "jpeg"):
            raise DataError(f"encode must be raw or jpeg, got {self.encode!r}")
