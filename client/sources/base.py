"""The frame-source interface and the factory that picks a reader for a path.

A source yields ``SourceFrame``s of all its cameras merged in capture-timestamp order;
iterating again starts from the beginning (that is how ``--loop`` works). Readers raise
perception.errors.DataError naming the file for anything unreadable or truncated, after
yielding every frame read before the damage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

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


def open_source(path: str | Path, options: SourceOptions | None = None) -> FrameSource:
    """Pick the reader for ``path``: a video file, a folder of videos (one per camera), an image
    folder, an MCAP file, a ROS 1 bag (.bag) or a ROS 2 bag (a directory with metadata.yaml,
    or its .db3 / .mcap)."""
    opts = options or SourceOptions()
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    suffix = p.suffix.lower()
    if p.is_dir():
        if (p / "metadata.yaml").is_file():
            from client.sources.bag_source import BagSource

            return BagSource(p, opts)
        images = [f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES]
        videos = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
        if videos and not images:
            from client.sources.video_source import VideoFolderSource

            return VideoFolderSource(p, opts, videos)
        from client.sources.folder_source import FolderSource

        return FolderSource(p, opts)
    if suffix == ".mcap":
        if (p.parent / "metadata.yaml").is_file():
            from client.sources.bag_source import BagSource

            return BagSource(p.parent, opts)
        from client.sources.mcap_source import McapSource

        return McapSource(p, opts)
    if suffix == ".db3":
        from client.sources.bag_source import BagSource

        return BagSource(p.parent, opts)
    if suffix == ".bag":
        from client.sources.bag_source import BagSource

        return BagSource(p, opts)
    if suffix in VIDEO_SUFFIXES:
        from client.sources.video_source import VideoSource

        return VideoSource(p, opts)
    raise DataError(
        f"{p}: unknown recording type {suffix!r}; expected a video ({', '.join(VIDEO_SUFFIXES)}), "
        "an image folder, .mcap, .bag or a ROS 2 bag directory"
    )
