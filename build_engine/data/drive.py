"""Recorded drives: time-ordered frames from one or more cameras with consistent motion.

Writes ``out_dir/<camera>.mp4`` per camera, ``out_dir/drive.mcap`` (ROS 2
``sensor_msgs/msg/CompressedImage``, JPEG, topic ``/cameras/<camera>/image/compressed``,
``header.frame_id`` = camera id, ``header.stamp`` = capture time, messages in time order) and
``out_dir/gt.json`` (COCO; each image has camera_id, sequence, timestamp_ns and file_name
``<camera>/<sequence:06d>.jpg``; each annotation a track_id). Sequence numbers start at 0 per
camera. The ego drives in the right lane at constant speed; other road users move at their
own speed, so an object keeps its identity and moves smoothly from frame to frame.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from build_engine.data.scene import LANE_WIDTH, ROAD_HALF, Camera, Look, WorldObject, random_object, render
from build_engine.model.config import DEFAULT_CLASSES
from perception.errors import ConfigError

log = logging.getLogger(__name__)

COMPRESSED_IMAGE_MSGDEF = """std_msgs/Header header
string format
uint8[] data
================================================================================
MSG: std_msgs/Header
builtin_interfaces/Time stamp
string frame_id
================================================================================
MSG: builtin_interfaces/Time
int32 sec
uint32 nanosec
"""
START_NS = 1_700_000_000_000_000_000
EGO_SPEED = 10.0  # m/s
EGO_X = LANE_WIDTH / 2
# Cameras are not triggered together: the rear one fires this long after the front one.
CAMERA_OFFSET_NS = {"front": 0, "rear": 3_000_000}


def topic_for(camera: str) -> str:
    return f"/cameras/{camera}/image/compressed"


def drive_world(rng: np.random.Generator, duration_s: float, probe: Camera) -> list[WorldObject]:
    """Road users and roadside objects along the stretch driven (world z in metres)."""
    span = EGO_SPEED * duration_s
    objs: list[WorldObject] = []
    tid = 0

    def add(kind: str, x: float, z: float, vz: float = 0.0, elevation: float | None = None) -> None:
        nonlocal tid
        tid += 1
        o = random_object(kind, rng, probe, tid)
        o.x, o.z, o.vz = x, z, vz
        if elevation is not None:
            o.elevation = elevation
        objs.append(o)

    # Our lane: a lead vehicle and a follower at (about) our speed, so nobody drives through us.
    add(str(rng.choice(["car", "truck", "bus"])), EGO_X, float(rng.uniform(14, 30)),
        EGO_SPEED + float(rng.uniform(-0.5, 0.8)))
    add("car", EGO_X, -float(rng.uniform(12, 25)), EGO_SPEED + float(rng.uniform(-0.3, 0.3)))
    # The outer lane overtakes or is overtaken; oncoming lanes pass by.
    for _ in range(int(rng.integers(3, 6))):
        add(str(rng.choice(["car", "car", "truck", "bus"])), ROAD_HALF - LANE_WIDTH / 2,
            float(rng.uniform(-60, 90 + span)), float(rng.uniform(6, 14)))
    for _ in range(int(rng.integers(4, 8))):
        lane = -LANE_WIDTH / 2 if rng.random() < 0.5 else -ROAD_HALF + LANE_WIDTH / 2
        add(str(rng.choice(["car", "car", "truck", "bus"])), lane, float(rng.uniform(0, 160 + 2 * span)),
            -float(rng.uniform(8, 13)))
    for _ in range(int(rng.integers(5, 10))):
        side = float(rng.choice([-1, 1]))
        add("pedestrian", side * float(rng.uniform(ROAD_HALF + 0.8, ROAD_HALF + 3)), float(rng.uniform(-40, 60 + span)),
            float(rng.choice([-1, 1])) * float(rng.uniform(0.8, 1.6)))
    for _ in range(int(rng.integers(1, 4))):
        add("cyclist", ROAD_HALF - 0.6, float(rng.uniform(-30, 60 + span)), float(rng.uniform(3.5, 6)))
    z = -40.0
    while z < 80 + span:  # lights and signs every few tens of metres, on either side
        add("traffic_light" if rng.random() < 0.4 else "traffic_sign",
            float(rng.choice([-1, 1])) * (ROAD_HALF + float(rng.uniform(0.8, 2))), z)
        z += float(rng.uniform(15, 35))
    for _ in range(int(rng.integers(10, 20))):
        add(str(rng.choice(["tree", "pole"])),
            float(rng.choice([-1, 1])) * float(rng.uniform(ROAD_HALF + 4, ROAD_HALF + 12)),
            float(rng.uniform(-60, 100 + span)))
    return objs


def _camera(name: str, width: int, height: int) -> Camera:
    if name not in CAMERA_OFFSET_NS:
        raise ConfigError(f"unknown camera {name!r}; the generator knows {sorted(CAMERA_OFFSET_NS)}")
    return Camera(width=width, height=height, focal=width * 0.8, horizon=height * 0.45, cx=width / 2,
                  cam_height=1.5, facing=1 if name == "front" else -1, x0=EGO_X)


def write_drive(
    out_dir: str | os.PathLike[str], cameras: list[str], frames: int, fps: float = 10.0, seed: int = 0,
    width: int = 960, height: int = 540, jpeg_quality: int = 80, write_mp4: bool = True,
) -> Path:
    """Render and write a recorded drive (see the module docstring). Returns ``out_dir``."""
    from mcap_ros2.writer import Writer as Ros2Writer

    if frames <= 0 or fps <= 0:
        raise ConfigError(f"frames and fps must be positive, got {frames}, {fps}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cams = {name: _camera(name, width, height) for name in cameras}
    world = drive_world(rng, frames / fps, next(iter(cams.values())))
    look = replace(Look.random(rng), blur_sigma=0.0, motion_blur=0, noise_sigma=float(rng.uniform(1.0, 2.5)), shadows=0)
    images: list[dict[str, Any]] = []  # COCO images and annotations
    anns: list[dict[str, Any]] = []
    period_ns = int(round(1e9 / fps))
    writers: dict[str, cv2.VideoWriter] = {}
    if write_mp4:
        mp4v = cv2.VideoWriter.fourcc("m", "p", "4", "v")
        for name in cameras:
            writers[name] = cv2.VideoWriter(str(root / f"{name}.mp4"), mp4v, fps, (width, height))
    with open(root / "drive.mcap", "wb") as f:
        mw = Ros2Writer(output=f)
        schema = mw.register_msgdef("sensor_msgs/msg/CompressedImage", COMPRESSED_IMAGE_MSGDEF)
        for seq in range(frames):
            t = seq / fps
            ego_z = EGO_SPEED * t
            moved = [replace(o, z=o.z + o.vz * t, x=o.x + o.vx * t) for o in world]
            for name, cam in cams.items():
                ts = START_NS + seq * period_ns + CAMERA_OFFSET_NS[name]
                r = render(moved, cam, look, ego_z=ego_z, time_s=t, noise_seed=seed * 7919 + seq * 31 + len(name))
                ok, jpg = cv2.imencode(".jpg", r.image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
                if not ok:
                    raise RuntimeError("JPEG encoding failed")
                if name in writers:
                    writers[name].write(r.image)
                stamp = {"sec": ts // 1_000_000_000, "nanosec": ts % 1_000_000_000}
                msg = {"header": {"stamp": stamp, "frame_id": name}, "format": "jpeg", "data": jpg.tobytes()}
                mw.write_message(topic_for(name), schema, msg, log_time=ts, publish_time=ts, sequence=seq)
                iid = len(images) + 1
                images.append({"id": iid, "file_name": f"{name}/{seq:06d}.jpg", "width": width, "height": height,
                               "camera_id": name, "sequence": seq, "timestamp_ns": ts})
                for b, c, tr in zip(r.boxes.tolist(), r.class_ids.tolist(), r.track_ids, strict=True):
                    bw, bh = b[2] - b[0], b[3] - b[1]
                    anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": int(c) + 1,
                                 "bbox": [b[0], b[1], bw, bh], "area": bw * bh, "iscrowd": 0, "track_id": tr})
        mw.finish()
    for w in writers.values():
        w.release()
    gt = {"info": {"description": "generated recorded drive", "fps": fps, "cameras": cameras, "seed": seed},
          "images": images, "annotations": anns,
          "categories": [{"id": i + 1, "name": n} for i, n in enumerate(DEFAULT_CLASSES)]}
    (root / "gt.json").write_text(json.dumps(gt))
    log.info("wrote drive %s: %d cameras x %d frames, %d objects", root, len(cameras), frames, len(anns))
    return root


def extract_frames(drive_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Turn a recorded drive into a COCO dataset: ``out_dir/images/<camera>/<seq:06d>.jpg``
    (the exact JPEG bytes from ``drive.mcap``) + ``out_dir/annotations.json`` (``gt.json``)."""
    from mcap_ros2.reader import read_ros2_messages

    src, dst = Path(drive_dir), Path(out_dir)
    gt = json.loads((src / "gt.json").read_text())
    by_stamp = {(im["camera_id"], im["timestamp_ns"]): im for im in gt["images"]}
    written = 0
    for m in read_ros2_messages(str(src / "drive.mcap")):
        h = m.ros_msg.header
        im = by_stamp.get((h.frame_id, h.stamp.sec * 1_000_000_000 + h.stamp.nanosec))
        if im is None:
            raise ConfigError(f"{src / 'drive.mcap'}: message on {m.channel.topic} "
                              f"at {h.stamp.sec}.{h.stamp.nanosec:09d} has no gt.json entry")
        f = dst / "images" / im["file_name"]
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(bytes(m.ros_msg.data))
        written += 1
    (dst / "annotations.json").write_text(json.dumps(gt))
    log.info("extracted %d frames from %s", written, src)
    return dst
