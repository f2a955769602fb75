"""MCAP recordings: ROS 2 sensor_msgs/Image and CompressedImage (CDR), Foxglove
CompressedImage (ROS 2, JSON or protobuf encoding).

Camera id = the message's frame_id, else the topic ("/cameras/<id>/..."); two topics whose
messages share a frame_id (a camera's raw and compressed topics, two cameras left at a generic
frame_id) are two cameras, the second named from its topic (``TopicCameras``). Capture time =
the message's header stamp, else the MCAP log time. With no topics chosen, every image topic is
replayed but those whose encoding no camera frame has (a depth topic's 16UC1), which are left
out with a warning. A file without a readable summary
(truncated while recording) is streamed record by record up to the damage.

A damaged file makes the mcap library raise almost anything (struct, zstd, Unicode, key,
overflow and schema-parser errors besides its own McapError), at open, in the summary, while
reading chunks and while parsing a schema: every one of them becomes a DataError naming the
file and what failed.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from client.frames import SourceFrame
from client.sources.base import SourceOptions
from client.sources.images import (
    UnsupportedEncoding,
    camera_from_topic,
    check_encoding,
    compressed_frame,
    ros_image_frame,
)
from perception.errors import DataError

log = logging.getLogger(__name__)

RAW_SCHEMAS = ("sensor_msgs/msg/Image", "sensor_msgs/Image")
COMPRESSED_SCHEMAS = (
    "sensor_msgs/msg/CompressedImage",
    "sensor_msgs/CompressedImage",
    "foxglove_msgs/msg/CompressedImage",
    "foxglove.CompressedImage",
)
IMAGE_SCHEMAS = RAW_SCHEMAS + COMPRESSED_SCHEMAS


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    """First present attribute / key of ``obj`` (decoded messages are objects or dicts)."""
    for n in names:
        if isinstance(obj, dict):
            if n in obj:
                return obj[n]
        elif hasattr(obj, n):
            return getattr(obj, n)
    return default


def stamp_ns(stamp: Any) -> int:
    """ROS 2 (sec, nanosec), ROS 1 / Foxglove JSON (sec, nsec), protobuf (seconds, nanos)."""
    if stamp is None:
        return 0
    sec = _get(stamp, "sec", "secs", "seconds", default=0) or 0
    nsec = _get(stamp, "nanosec", "nsec", "nsecs", "nanos", default=0) or 0
    return int(sec) * 1_000_000_000 + int(nsec)


class TopicCameras:
    """The camera id and next sequence of each (topic, frame_id) a recording's messages carry.

    A pair's camera is its frame_id (else a name from the topic), unless another pair took that
    name first: then its topic, slashes as underscores. Two topics with one frame_id (a camera's raw and
    compressed topics, two cameras left at a generic "camera_optical_frame") were merged into one
    camera, each capture sent twice with the sequences interleaved."""

    def __init__(self) -> None:
        self._cameras: dict[tuple[str, str], str] = {}
        self._taken: set[str] = set()
        self.counts: dict[str, int] = defaultdict(int)  # frames per camera

    def next(self, topic: str, frame_id: str) -> tuple[str, int]:
        """The camera of a message and its sequence (counted up)."""
        camera = self._cameras.get((topic, frame_id))
        if camera is None:
            camera = frame_id or camera_from_topic(topic)
            if camera in self._taken:
                taken = camera
                camera = base = topic.strip("/").replace("/", "_") or "camera"  # the topic, whole
                n = 2
                while camera in self._taken:
                    camera, n = f"{base}_{n}", n + 1
                log.warning("topic %s: frame_id %r is another topic's camera already; its frames are camera %r",
                            topic, taken, camera)
            self._taken.add(camera)
            self._cameras[(topic, frame_id)] = camera
        seq = self.counts[camera]
        self.counts[camera] += 1
        return camera, seq


def message_to_frame(
    msg: Any, schema_name: str, topic: str, log_time: int, cameras: TopicCameras, where: str
) -> SourceFrame:
    """Convert one decoded image message (ROS 2, ROS 1 or Foxglove) to a SourceFrame and
    advance its camera's sequence counter."""
    header = _get(msg, "header")
    if header is not None:
        frame_id = _get(header, "frame_id", default="") or ""
        ts = stamp_ns(_get(header, "stamp"))
    else:  # Foxglove: timestamp + frame_id at top level
        frame_id = _get(msg, "frame_id", default="") or ""
        ts = stamp_ns(_get(msg, "timestamp"))
    if schema_name in RAW_SCHEMAS:
        # Before the camera is named and counted: a depth topic sharing the colour camera's
        # frame_id took its name when its message came first, and a recording of depth topics
        # only replayed nothing without saying so.
        check_encoding(str(_get(msg, "encoding")), where)
    camera, seq = cameras.next(topic, str(frame_id))
    ts = ts or int(log_time)
    if schema_name in RAW_SCHEMAS:
        return ros_image_frame(
            camera, seq, ts, str(_get(msg, "encoding")), int(_get(msg, "width")), int(_get(msg, "height")),
            int(_get(msg, "step")), bytes(_get(msg, "data")), where,
        )
    data = _get(msg, "data", default=b"")
    if isinstance(data, str):  # Foxglove JSON carries bytes as base64
        data = base64.b64decode(data)
    return compressed_frame(camera, seq, ts, bytes(data), where)


def _protobuf_decoder(schema: Any) -> Callable[[bytes], Any]:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fds = descriptor_pb2.FileDescriptorSet.FromString(schema.data)
    pool = descriptor_pool.DescriptorPool()
    for fd in fds.file:
        pool.Add(fd)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(schema.name))
    return cls.FromString


def make_decoder(schema: Any, message_encoding: str) -> Callable[[bytes], Any]:
    """A bytes -> message function for one channel; DataError if the encoding is unknown."""
    if message_encoding == "cdr" and schema is not None and schema.encoding == "ros2msg":
        from mcap_ros2.decoder import DecoderFactory

        dec = DecoderFactory().decoder_for("cdr", schema)
        if dec is not None:
            return dec
    if message_encoding == "json":
        return lambda data: json.loads(data)
    if message_encoding == "protobuf" and schema is not None:
        return _protobuf_decoder(schema)
    name = schema.name if schema is not None else "?"
    raise DataError(f"cannot decode {name} messages encoded as {message_encoding!r}")


class UnsupportedTopics:
    """Topics left out of a replay for an encoding no camera frame has. A topic the user chose
    (``--topic``) is an error instead: they asked for it."""

    def __init__(self, chosen: bool) -> None:
        self._chosen = chosen
        self._why: dict[str, str] = {}

    def __contains__(self, topic: str) -> bool:
        return topic in self._why

    def add(self, topic: str, exc: UnsupportedEncoding) -> None:
        if self._chosen:
            raise exc
        log.warning("%s; the topic is left out of the replay (choose topics with --topic)", exc)
        self._why[topic] = str(exc)

    def why(self) -> str:
        return "".join(f" ({reason})" for reason in self._why.values())

class McapSource:
    def __init__(self, path: Path, options: SourceOptions) -> None:
        self.path = Path(path)
        self._opts = options
        self.seekable = True
        self.topics = self._image_topics()
        if not self.topics:
            raise DataError(f"{self.path}: no image topics ({', '.join(IMAGE_SCHEMAS)})")
        if options.topics:
            unknown = [t for t in options.topics if t not in self.topics]
            if unknown:
                raise DataError(
                    f"{self.path}: unknown topic {unknown[0]!r}; image topics: {', '.join(sorted(self.topics))}"
                )
            self.topics = {t: self.topics[t] for t in options.topics}

    def _image_topics(self) -> dict[str, tuple[str, int]]:
        """topic -> (schema name, message count or -1) of the image channels."""
        from mcap.reader import NonSeekingReader, SeekingReader

        try:
            with open(self.path, "rb") as f:
                summary = SeekingReader(f).get_summary()
        except Exception as exc:  # a damaged summary or footer: the records before it may still be readable
            log.debug("%s: no summary (%s: %s)", self.path, type(exc).__name__, exc)
            summary = None
        if summary is not None:
            counts = summary.statistics.channel_message_counts if summary.statistics else {}
            out = {}
            for cid, ch in summary.channels.items():
                schema = summary.schemas.get(ch.schema_id)
                if schema is not None and schema.name in IMAGE_SCHEMAS:
                    out[ch.topic] = (schema.name, int(counts.get(cid, -1)))
            return out
        # No summary: truncated, or still being written. Scan the records that are there.
        self.seekable = False
        out = {}
        try:
            with open(self.path, "rb") as f:
                for schema, ch, _ in NonSeekingReader(f).iter_messages(log_time_order=False):
                    if schema is not None and schema.name in IMAGE_SCHEMAS and ch.topic not in out:
                        out[ch.topic] = (schema.name, -1)
        except Exception as exc:  # the library fails anywhere in a damaged record (module docstring)
            if not out:
                raise DataError(f"{self.path}: not a readable MCAP file ({type(exc).__name__}: {exc})") from exc
            log.warning("%s: truncated MCAP (%s); replaying the readable part", self.path, exc)
        return out

    def describe(self) -> str:
        parts = [f"{t} [{s.split('/')[-1]}{'' if n < 0 else f', {n}'}]" for t, (s, n) in sorted(self.topics.items())]
        return f"MCAP {self.path.name}: " + "; ".join(parts)

    def __iter__(self) -> Iterator[SourceFrame]:
        cameras = TopicCameras()
        decoders: dict[int, Callable[[bytes], Any]] = {}
        topics = list(self.topics)
        skipped = UnsupportedTopics(chosen=bool(self._opts.topics))
        for schema, channel, message in self._messages(topics):
            if channel.topic in skipped:
                continue
            dec = decoders.get(channel.id)
            if dec is None:
                try:
                    dec = decoders[channel.id] = make_decoder(schema, channel.message_encoding)
                except DataError as exc:
                    raise DataError(f"{self.path}: {channel.topic}: {exc}") from exc
                except Exception as exc:  # a damaged schema record fails in the schema parser
                    name = schema.name if schema is not None else "?"
                    raise DataError(f"{self.path}: {channel.topic}: cannot read the schema of {name} "
                                    f"({type(exc).__name__}: {exc})") from exc
            where = f"{self.path}: {channel.topic} message at {message.log_time}"
            try:
                msg = dec(message.data)
            except Exception as exc:  # decoders raise anything on a corrupt payload
                raise DataError(f"{where}: cannot decode ({type(exc).__name__}: {exc})") from exc
            if schema is None:  # a schemaless channel sharing an image topic's name
                raise DataError(f"{where}: channel has no schema")
            try:
                frame = message_to_frame(msg, schema.name, channel.topic, message.log_time, cameras, where)
            except UnsupportedEncoding as exc:
                skipped.add(channel.topic, exc)
                continue
            except DataError:
                raise
            except Exception as exc:  # e.g. raw pixels too short for the size it declares
                raise DataError(f"{where}: malformed image message ({type(exc).__name__}: {exc})") from exc
            yield frame
        if not cameras.counts:
            raise DataError(f"{self.path}: no image messages on {', '.join(topics)}{skipped.why()}")


    def _messages(self, topics: list[str]) -> Iterator[tuple[Any, Any, Any]]:
        """The library's (schema, channel, message) on ``topics``. Whatever it raises on a damaged
        file becomes a DataError saying how far the reading got: the messages already yielded
        (each replayed) and the byte it had reached, where a truncation ends or past a damaged chunk."""
        from mcap.reader import NonSeekingReader, SeekingReader

        read = 0
        try:
            with open(self.path, "rb") as f:
                try:
                    reader = SeekingReader(f) if self.seekable else NonSeekingReader(f)
                    # Without a summary there is no index to merge by: records come in file order.
                    for item in reader.iter_messages(topics=topics, log_time_order=self.seekable):
                        yield item
                        read += 1
                except Exception as exc:  # only the library runs in here: the consumer's errors stay with it
                    raise DataError(
                        f"{self.path}: truncated or corrupt MCAP: unreadable after {read} image messages, at "
                        f"byte {f.tell()} of {os.fstat(f.fileno()).st_size} ({type(exc).__name__}: {exc})"
                    ) from exc
        except OSError as exc:  # opening or closing the file; the reading's errors are DataErrors by now
            raise DataError(f"{self.path}: cannot read: {exc.strerror or exc}") from exc
