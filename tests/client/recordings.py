"""Small recordings the client tests make themselves: MP4, image folders, MCAP, ROS bags."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

HEADER_DEF = """
================================================================================
MSG: std_msgs/Header
builtin_interfaces/Time stamp
string frame_id
================================================================================
MSG: builtin_interfaces/Time
int32 sec
uint32 nanosec
"""
COMPRESSED_DEF = "std_msgs/Header header\nstring format\nuint8[] data" + HEADER_DEF
IMAGE_DEF = (
    "std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\nuint8 is_bigendian\nuint32 step\n"
    "uint8[] data" + HEADER_DEF
)
FOXGLOVE_DEF = """builtin_interfaces/Time timestamp
string frame_id
uint8[] data
string format
================================================================================
MSG: builtin_interfaces/Time
int32 sec
uint32 nanosec
"""

T0_NS = 1_700_000_000_000_000_000


def scene(i: int, w: int = 96, h: int = 64, seed: int = 0) -> np.ndarray:
    """A BGR image with a few coloured rectangles that move with ``i``."""
    rng = np.random.default_rng(seed + i)
    img = np.full((h, w, 3), 90, np.uint8)
    img += rng.integers(0, 20, img.shape, dtype=np.uint8)
    x = (i * 5) % (w - 20)
    cv2.rectangle(img, (x, h // 4), (x + 18, h // 4 + 14), (0, 0, 230), -1)
    cv2.rectangle(img, (w - x - 16, h // 2), (w - x, h // 2 + 20), (230, 200, 0), -1)
    return img


def jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def write_mp4(path: Path, n: int = 8, w: int = 96, h: int = 64, fps: float = 20.0) -> Path:
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
    assert vw.isOpened()
    for i in range(n):
        vw.write(scene(i, w, h))
    vw.release()
    return path


def write_folder(root: Path, cameras: tuple[str, ...] = ("front",), n: int = 5, png: bool = False) -> Path:
    for cam in cameras:
        d = root / cam if len(cameras) > 1 else root
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            ext = ".png" if png else ".jpg"
            cv2.imwrite(str(d / f"{i:06d}{ext}"), scene(i))
    return root


def _stamp(ns: int) -> dict[str, int]:
    return {"sec": ns // 1_000_000_000, "nanosec": ns % 1_000_000_000}


def write_mcap_ros2(
    path: Path, cameras: tuple[str, ...] = ("front", "rear"), n: int = 6, period_ms: float = 50.0, raw_camera: str = "",
    chunk_size: int = 1024 * 1024,
) -> Path:
    """ROS 2 MCAP: CompressedImage JPEG per camera on /cameras/<id>/image/compressed, and for
    ``raw_camera`` sensor_msgs/Image rgb8 on /cameras/<id>/image_raw. Cameras are offset by a
    few ms so the merge order is well defined."""
    from mcap_ros2.writer import Writer

    with open(path, "wb") as f:
        writer = Writer(f, chunk_size=chunk_size)
        comp = writer.register_msgdef("sensor_msgs/msg/CompressedImage", COMPRESSED_DEF)
        raw = writer.register_msgdef("sensor_msgs/msg/Image", IMAGE_DEF)
        for i in range(n):
            for k, cam in enumerate(cameras):
                ts = T0_NS + int(i * period_ms * 1e6) + k * 3_000_000
                img = scene(i, seed=k)
                if cam == raw_camera:
                    rgb = img[:, :, ::-1].copy()
                    msg = {
                        "header": {"stamp": _stamp(ts), "frame_id": cam},
                        "height": rgb.shape[0], "width": rgb.shape[1], "encoding": "rgb8",
                        "is_bigendian": 0, "step": rgb.shape[1] * 3, "data": rgb.tobytes(),
                    }
                    writer.write_message(f"/cameras/{cam}/image_raw", raw, msg, log_time=ts)
                else:
                    msg = {"header": {"stamp": _stamp(ts), "frame_id": cam}, "format": "jpeg", "data": jpeg(img)}
                    writer.write_message(f"/cameras/{cam}/image/compressed", comp, msg, log_time=ts)
        writer.finish()
    return path


def write_mcap_foxglove(path: Path, n: int = 4, encoding: str = "json") -> Path:
    """Foxglove CompressedImage on /cam/left: JSON-encoded, or ROS 2 CDR (foxglove_msgs)."""
    import base64

    if encoding == "protobuf":
        return _write_mcap_foxglove_protobuf(path, n)
    if encoding == "cdr":
        from mcap_ros2.writer import Writer as Ros2Writer

        with open(path, "wb") as f:
            w = Ros2Writer(f)
            schema = w.register_msgdef("foxglove_msgs/msg/CompressedImage", FOXGLOVE_DEF)
            for i in range(n):
                ts = T0_NS + i * 100_000_000
                msg = {"timestamp": _stamp(ts), "frame_id": "left", "data": jpeg(scene(i)), "format": "jpeg"}
                w.write_message("/cam/left", schema, msg, log_time=ts)
            w.finish()
        return path
    from mcap.writer import Writer

    with open(path, "wb") as f:
        writer = Writer(f)
        writer.start()
        sid = writer.register_schema("foxglove.CompressedImage", "jsonschema", json.dumps({"type": "object"}).encode())
        cid = writer.register_channel("/cam/left", "json", sid)
        for i in range(n):
            ts = T0_NS + i * 100_000_000
            msg = {
                "timestamp": {"sec": ts // 10**9, "nsec": ts % 10**9},
                "frame_id": "left",
                "format": "jpeg",
                "data": base64.b64encode(jpeg(scene(i))).decode(),
            }
            writer.add_message(cid, log_time=ts, data=json.dumps(msg).encode(), publish_time=ts)
        writer.finish()
    return path


def write_bag(
    path: Path, ros1: bool, n: int = 5, cameras: tuple[str, ...] = ("front", "side"), storage: str = "sqlite3"
) -> Path:
    """A ROS 1 .bag or ROS 2 bag directory: CompressedImage for the first camera, Image bgr8
    for the others."""
    from rosbags.rosbag1 import Writer as Ros1Writer
    from rosbags.rosbag2 import Writer as Ros2Writer
    from rosbags.rosbag2.writer import StoragePlugin
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
    Header = store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]
    Comp = store.types["sensor_msgs/msg/CompressedImage"]
    Img = store.types["sensor_msgs/msg/Image"]

    def header(ts: int, cam: str, seq: int):
        t = Time(sec=ts // 10**9, nanosec=ts % 10**9)
        return Header(seq=seq, stamp=t, frame_id=cam) if ros1 else Header(stamp=t, frame_id=cam)

    writer: Ros1Writer | Ros2Writer
    if ros1:
        writer = Ros1Writer(path)
        ser = store.serialize_ros1
    else:
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        writer = Ros2Writer(path, version=9, storage_plugin=plugin)
        ser = store.serialize_cdr
    with writer:
        conns = {}
        for k, cam in enumerate(cameras):
            if k == 0:
                conns[cam] = writer.add_connection(f"/{cam}/image/compressed", Comp.__msgtype__, typestore=store)
            else:
                conns[cam] = writer.add_connection(f"/{cam}/image_raw", Img.__msgtype__, typestore=store)
        for i in range(n):
            for k, cam in enumerate(cameras):
                ts = T0_NS + i * 50_000_000 + k * 1_000_000
                img = scene(i, seed=k)
                if k == 0:
                    msg = Comp(header=header(ts, cam, i), format="jpeg", data=np.frombuffer(jpeg(img), np.uint8))
                    writer.write(conns[cam], ts, ser(msg, Comp.__msgtype__))
                else:
                    msg = Img(
                        header=header(ts, cam, i), height=img.shape[0], width=img.shape[1], encoding="bgr8",
                        is_bigendian=0, step=img.shape[1] * 3, data=img.reshape(-1),
                    )
                    writer.write(conns[cam], ts, ser(msg, Img.__msgtype__))
    return path


def _foxglove_protobuf_schema() -> tuple[bytes, type]:
    """foxglove.CompressedImage as a FileDescriptorSet (with its google.protobuf.Timestamp
    dependency), the way Foxglove's protobuf writers store schemas in MCAP."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

    ts_file = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(ts_file)
    f = descriptor_pb2.FileDescriptorProto(name="foxglove/CompressedImage.proto", package="foxglove", syntax="proto3",
                                           dependency=["google/protobuf/timestamp.proto"])
    m = f.message_type.add(name="CompressedImage")
    F = descriptor_pb2.FieldDescriptorProto
    m.field.add(name="timestamp", number=1, type=F.TYPE_MESSAGE, type_name=".google.protobuf.Timestamp",
                label=F.LABEL_OPTIONAL)
    m.field.add(name="frame_id", number=4, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    m.field.add(name="data", number=2, type=F.TYPE_BYTES, label=F.LABEL_OPTIONAL)
    m.field.add(name="format", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    fds = descriptor_pb2.FileDescriptorSet(file=[ts_file, f])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(ts_file)
    pool.Add(f)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("foxglove.CompressedImage"))
    return fds.SerializeToString(), cls


def _write_mcap_foxglove_protobuf(path: Path, n: int) -> Path:
    from mcap.writer import Writer

    schema_data, cls = _foxglove_protobuf_schema()
    with open(path, "wb") as f:
        w = Writer(f)
        w.start()
        sid = w.register_schema("foxglove.CompressedImage", "protobuf", schema_data)
        cid = w.register_channel("/cam/left", "protobuf", sid)
        for i in range(n):
            ts = T0_NS + i * 100_000_000
            msg = cls(frame_id="left", format="jpeg", data=jpeg(scene(i)))
            msg.timestamp.seconds, msg.timestamp.nanos = ts // 10**9, ts % 10**9
            w.add_message(cid, log_time=ts, data=msg.SerializeToString(), publish_time=ts)
        w.finish()
    return path
