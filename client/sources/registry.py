"""Which reader opens a recording: the kind of a path, and one opener per kind.

Imports point one way, ``registry -> readers -> base``: the readers know only the interface in
base.py, and only this module knows the readers. A new recording format is a reader module,
one ``SourceKind``, one ``OPENERS`` line and the rule in ``locate`` that recognises it.

A live camera (``rtsp://``, ``http://`` URL, ``/dev/videoN``) is not a path: ``open_source``
recognises it first (live_source.live_target) and never looks for it on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path

from client.sources.bag_source import BagSource
from client.sources.base import IMAGE_SUFFIXES, VIDEO_SUFFIXES, FrameSource, SourceOptions
from client.sources.folder_source import FolderSource
from client.sources.live_source import LiveSource, live_target
from client.sources.mcap_source import McapSource
from client.sources.video_source import VideoFolderSource, VideoSource
from perception.errors import DataError


class SourceKind(Enum):
    """The recording formats a replay reads."""

    VIDEO = "video"
    VIDEO_FOLDER = "video folder"
    IMAGE_FOLDER = "image folder"
    MCAP = "MCAP"
    ROS_BAG = "ROS bag"


Opener = Callable[[Path, SourceOptions], FrameSource]


def _video_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)


def _open_video_folder(path: Path, options: SourceOptions) -> FrameSource:
    return VideoFolderSource(path, options, _video_files(path))


OPENERS: dict[SourceKind, Opener] = {
    SourceKind.VIDEO: VideoSource,
    SourceKind.VIDEO_FOLDER: _open_video_folder,
    SourceKind.IMAGE_FOLDER: FolderSource,
    SourceKind.MCAP: McapSource,
    SourceKind.ROS_BAG: BagSource,
}


def locate(path: Path) -> tuple[SourceKind, Path]:
    """The kind of the recording at an existing ``path`` and the path its reader opens (a ROS 2
    bag is opened as its directory, also when given its .db3 / .mcap file). DataError for
    anything else."""
    suffix = path.suffix.lower()
    if path.is_dir():
        if (path / "metadata.yaml").is_file():
            return SourceKind.ROS_BAG, path
        # Videos: one camera per video file; images: image folders. Not both: a screenshot in a
        # notes/ folder made a folder of videos one camera of one frame.
        videos = _video_files(path)
        images = [f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES] if videos else []
        if videos and images:
            shown = ", ".join(f.relative_to(path).as_posix() for f in sorted(images)[:3])
            more = f" and {len(images) - 3} more" if len(images) > 3 else ""
            raise DataError(f"{path}: videos ({', '.join(f.name for f in videos[:3])}"
                            f"{' ...' if len(videos) > 3 else ''}) and images ({shown}{more}) both: a folder "
                            "replays one kind; move the images out, or replay a video or an image folder on its own")
        return (SourceKind.VIDEO_FOLDER if videos else SourceKind.IMAGE_FOLDER), path
    if suffix == ".mcap":
        if (path.parent / "metadata.yaml").is_file():
            return SourceKind.ROS_BAG, path.parent
        return SourceKind.MCAP, path
    if suffix == ".db3":
        return SourceKind.ROS_BAG, path.parent
    if suffix == ".bag":
        return SourceKind.ROS_BAG, path
    if suffix in VIDEO_SUFFIXES:
        return SourceKind.VIDEO, path
    raise DataError(
        f"{path}: unknown recording type {suffix!r}; expected a video ({', '.join(VIDEO_SUFFIXES)}), "
        "an image folder, .mcap, .bag or a ROS 2 bag directory"
    )


def open_source(path: str | Path, options: SourceOptions | None = None) -> FrameSource:
    """Open the reader for ``path``: a video file, a folder of videos (one per camera), an image
    folder, an MCAP file, a ROS 1 bag (.bag) or a ROS 2 bag (a directory with metadata.yaml,
    or its .db3 / .mcap); or a live camera (RTSP / HTTP URL, V4L2 device), read until its
    stream ends."""
    live = live_target(path)
    if live is not None:
        return LiveSource(live, options or SourceOptions())
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    kind, where = locate(p)
    return OPENERS[kind](where, options or SourceOptions())
