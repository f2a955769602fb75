"""ROS 1 (.bag) and ROS 2 (directory with metadata.yaml) bags through the rosbags library."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from client.frames import SourceFrame
from client.sources.base import SourceOptions
from client.sources.images import UnsupportedEncoding
from client.sources.mcap_source import IMAGE_SCHEMAS, RAW_SCHEMAS, TopicCameras, UnsupportedTopics, message_to_frame
from perception.errors import DataError

log = logging.getLogger(__name__)


def _reader(path: Path) -> Any:
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    return AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE))


def _normalise(msgtype: str) -> str:
    """rosbags names ROS 1 types "sensor_msgs/msg/Image" too; keep one spelling."""
    return msgtype if "/msg/" in msgtype else msgtype.replace("/", "/msg/", 1)


class BagSource:
    def __init__(self, path: Path, options: SourceOptions) -> None:
        self.path = Path(path)
        self._opts = options
        try:
            with _reader(self.path) as reader:
                self.topics = {
                    c.topic: (_normalise(c.msgtype), int(c.msgcount))
                    for c in reader.connections
                    if _normalise(c.msgtype) in IMAGE_SCHEMAS
                }
        except Exception as exc:  # rosbags raises its own per-format errors (and struct errors)
            raise DataError(f"{self.path}: not a readable ROS bag ({type(exc).__name__}: {exc})") from exc
        if not self.topics:
            raise DataError(f"{self.path}: no image topics (sensor_msgs Image / CompressedImage)")
        if options.topics:
            unknown = [t for t in options.topics if t not in self.topics]
            if unknown:
                raise DataError(
                    f"{self.path}: unknown topic {unknown[0]!r}; image topics: {', '.join(sorted(self.topics))}"
                )
            self.topics = {t: self.topics[t] for t in options.topics}

    def describe(self) -> str:
        parts = [f"{t} [{s.split('/')[-1]}, {n}]" for t, (s, n) in sorted(self.topics.items())]
        return f"ROS bag {self.path.name}: " + "; ".join(parts)

    def __iter__(self) -> Iterator[SourceFrame]:
        cameras = TopicCameras()
        skipped = UnsupportedTopics(chosen=bool(self._opts.topics))
        try:
            with _reader(self.path) as reader:
                conns = [c for c in reader.connections if c.topic in self.topics]
                for conn, log_time, raw in reader.messages(connections=conns):
                    if conn.topic in skipped:
                        continue
                    where = f"{self.path}: {conn.topic} message at {log_time}"
                    try:
                        msg = reader.deserialize(raw, conn.msgtype)
                    except Exception as exc:  # a corrupt payload can fail anywhere in the deserializer
                        raise DataError(f"{where}: cannot decode ({type(exc).__name__}: {exc})") from exc
                    schema = _normalise(conn.msgtype)
                    try:
                        frame = message_to_frame(msg, schema if schema in RAW_SCHEMAS
                                                 else "sensor_msgs/msg/CompressedImage",
                                                 conn.topic, log_time, cameras, where)
                    except UnsupportedEncoding as exc:
                        skipped.add(conn.topic, exc)
                        continue
                    yield frame
        except DataError:
            raise
        except Exception as exc:  # truncated bag: rosbags raises format-specific errors
            raise DataError(f"{self.path}: truncated or corrupt bag ({type(exc).__name__}: {exc})") from exc
        if not cameras.counts:  # as an MCAP: a replay of nothing is no success (it exited 0 with 0 frames)
            raise DataError(f"{self.path}: no image messages on {', '.join(self.topics)}{skipped.why()}")
