"""Recorded drives: time-ordered frames from one or more cameras with consistent motion.

Writes ``out_dir/<camera>.mp4`` per camera, ``out_dir/drive.mcap`` (ROS 2
``sensor_msgs/msg/CompressedImage``, JPEG, topic ``/cameras/<camera>/image/compressed``,
``header.frame_id`` = camera id, ``header.stamp`` = capture time, messages in time order) and
``out_dir/gt.json`` (COCO; each image has camera_id, sequence, timestamp_ns and file_name
``<camera>/<sequence:06d>.jpg``) and ``out_dir/gt_mot_<camera>.txt`` per camera (the same
ground truth as MOTChallenge text, see ``write_mot_gt``). Sequence numbers start at 0 per
camera. The ego drives in the right lane at constant speed; other road users move at their
own speed, so an object keeps its identity and moves smoothly from frame to frame.

Identity: every annotation has a ``track_id``, the id of its object in the generated world
(an int >= 1). It is the same in every frame and every camera that sees the object, also after
the object was hidden (occluded, or out of view) for a while; ids are unique within a drive.

``Traffic`` sets how busy the road is. Its defaults draw exactly the world they always drew,
so a drive made with the same arguments is the same drive (the bundled demo among them).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
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


# Crossings: where the pair meets, metres ahead of (or behind) the ego: beyond the vehicle that
# leads (14-30 m) or follows (12-25 m) in our lane, so that each passes behind it; and beside
# our lane (this far from its centre), so that the meeting itself is in view.
CROSSING_DISTANCE_M = (32.0, 48.0)
CROSSING_OFFSET_M = (2.5, 4.5)
WALK_SPEED = (1.1, 1.7)  # m/s across the road
CYCLE_SPEED = (3.0, 4.5)


@dataclass(frozen=True)
class Traffic:
    """How busy a generated drive is.

    density: multiplies how many road users (vehicles in the outer and oncoming lanes,
        pedestrians, cyclists) and roadside trees and poles are drawn. At 1.0 the counts suit
        a drive of a few seconds (the bundled demo: 6 s); the stretch they spread over grows
        with the drive, but not in proportion (it has fixed margins ahead and behind), so use
        ``density_per_metre_like`` for a longer drive as busy per metre as a shorter one. Signs,
        lights and the vehicles just ahead and behind are not scaled.
    crossings_per_min: pairs of road users (pedestrians, now and then cyclists) that walk
        across the road in front of a camera from opposite sides: they meet, their boxes
        crossing, beside our lane, and each passes behind the vehicle in our lane (the one
        ahead of the ego, or the one behind), which hides it for a few seconds. Drawn from a
        random stream of their own, so they add to a drive without changing the rest of it.
    """

    density: float = 1.0
    crossings_per_min: float = 0.0

    def __post_init__(self) -> None:
        for name in ("density", "crossings_per_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"Traffic.{name} must be a finite number >= 0, got {value!r}")


# The stretch of road (world z, metres, from .. to) each scaled kind of object is spread over,
# for a drive covering ``span`` metres, and how many of them density 1 draws on average.
def _stretches(span: float) -> dict[str, tuple[float, float, float]]:
    return {
        "outer lane": (-60.0, 90.0 + span, 4.0),
        "oncoming": (0.0, 160.0 + 2 * span, 5.5),
        "pedestrian": (-40.0, 60.0 + span, 7.0),
        "cyclist": (-30.0, 60.0 + span, 2.0),
        "roadside": (-60.0, 100.0 + span, 14.5),
    }


def density_per_metre_like(duration_s: float, reference_s: float) -> float:
    """The ``Traffic.density`` at which a ``duration_s`` drive has as many scaled objects per
    metre of their stretch as a ``reference_s`` drive at density 1 (weighted by how many of
    each kind there are). Not ``duration_s / reference_s``: each stretch has fixed margins, so
    that ratio makes a 180 s drive about 2.5 times as busy per metre as a 6 s one."""
    ref, new = _stretches(EGO_SPEED * reference_s), _stretches(EGO_SPEED * duration_s)
    total = sum(n for _, _, n in ref.values())
    return sum(n * (new[k][1] - new[k][0]) / (hi - lo) for k, (lo, hi, n) in ref.items()) / total


def topic_for(camera: str) -> str:
    return f"/cameras/{camera}/image/compressed"


def drive_world(
    rng: np.random.Generator, duration_s: float, probe: Camera, density: float = 1.0
) -> list[WorldObject]:
    """Road users and roadside objects along the stretch driven (world z in metres); their
    track ids count from 1. ``density`` scales the counts (see ``Traffic``)."""
    span = EGO_SPEED * duration_s
    stretch = {k: (lo, hi) for k, (lo, hi, _) in _stretches(span).items()}
    objs: list[WorldObject] = []
    tid = 0

    def count(lo: int, hi: int) -> int:
        # One draw whatever the density, so that density 1 draws what it always drew.
        return int(round(int(rng.integers(lo, hi)) * density))

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
    for _ in range(count(3, 6)):
        add(str(rng.choice(["car", "car", "truck", "bus"])), ROAD_HALF - LANE_WIDTH / 2,
            float(rng.uniform(*stretch["outer lane"])), float(rng.uniform(6, 14)))
    for _ in range(count(4, 8)):
        lane = -LANE_WIDTH / 2 if rng.random() < 0.5 else -ROAD_HALF + LANE_WIDTH / 2
        add(str(rng.choice(["car", "car", "truck", "bus"])), lane, float(rng.uniform(*stretch["oncoming"])),
            -float(rng.uniform(8, 13)))
    for _ in range(count(5, 10)):
        side = float(rng.choice([-1, 1]))
        add("pedestrian", side * float(rng.uniform(ROAD_HALF + 0.8, ROAD_HALF + 3)),
            float(rng.uniform(*stretch["pedestrian"])),
            float(rng.choice([-1, 1])) * float(rng.uniform(0.8, 1.6)))
    for _ in range(count(1, 4)):
        add("cyclist", ROAD_HALF - 0.6, float(rng.uniform(*stretch["cyclist"])), float(rng.uniform(3.5, 6)))
    z = -40.0
    while z < 80 + span:  # lights and signs every few tens of metres, on either side
        add("traffic_light" if rng.random() < 0.4 else "traffic_sign",
            float(rng.choice([-1, 1])) * (ROAD_HALF + float(rng.uniform(0.8, 2))), z)
        z += float(rng.uniform(15, 35))
    for _ in range(count(10, 20)):
        add(str(rng.choice(["tree", "pole"])),
            float(rng.choice([-1, 1])) * float(rng.uniform(ROAD_HALF + 4, ROAD_HALF + 12)),
            float(rng.uniform(*stretch["roadside"])))
    return objs


def crossing_pairs(
    rng: np.random.Generator, duration_s: float, probe: Camera, per_min: float, facings: Sequence[int],
    first_id: int,
) -> list[WorldObject]:
    """Pairs of road users crossing the road from opposite sides (see ``Traffic``), spread
    evenly over the drive, in front of a camera facing one of ``facings`` (1 = forward);
    track ids count from ``first_id``.

    A pair meets at time ``t`` at ``CROSSING_DISTANCE_M`` from the ego and ``CROSSING_OFFSET_M``
    to the left or right of our lane's centre: the nearer one walks one way, the farther one
    (1.5-3 m farther) the other, so their boxes cross and the nearer hides the farther for a
    moment; before or after, each walks through our lane, behind the vehicle in it.
    """
    n = int(round(per_min * duration_s / 60.0))
    objs: list[WorldObject] = []
    for k in range(n):
        t = (k + float(rng.uniform(0.25, 0.75))) * duration_s / n
        facing = int(facings[int(rng.integers(len(facings)))])
        z_meet = EGO_SPEED * t + facing * float(rng.uniform(*CROSSING_DISTANCE_M))
        x_meet = EGO_X + float(rng.choice([-1.0, 1.0])) * float(rng.uniform(*CROSSING_OFFSET_M))
        direction = float(rng.choice([-1.0, 1.0]))
        for j, dz in enumerate((0.0, facing * float(rng.uniform(1.5, 3.0)))):
            kind = "cyclist" if rng.random() < 0.2 else "pedestrian"
            speed = float(rng.uniform(*(CYCLE_SPEED if kind == "cyclist" else WALK_SPEED)))
            vx = speed * (direction if j == 0 else -direction)
            o = random_object(kind, rng, probe, first_id + len(objs))
            # x(time) = x_meet + vx * (time - t): both are at the meeting point at time t.
            o.x, o.z, o.vx, o.vz = x_meet - vx * t, z_meet + dz, vx, 0.0
            objs.append(o)
    return objs


def _camera(name: str, width: int, height: int) -> Camera:
    if name not in CAMERA_OFFSET_NS:
        raise ConfigError(f"unknown camera {name!r}; the generator knows {sorted(CAMERA_OFFSET_NS)}")
    return Camera(width=width, height=height, focal=width * 0.8, horizon=height * 0.45, cx=width / 2,
                  cam_height=1.5, facing=1 if name == "front" else -1, x0=EGO_X)


def _projected_area(o: WorldObject, cam: Camera, ego_z: float) -> float:
    """Area in pixels of the object's whole box as ``scene.render`` projects it (rounded to
    pixels, before occlusion and the image edge are taken off)."""
    z = (o.z - ego_z) * cam.facing
    u_a, v_bottom = cam.project(o.x - o.width / 2, o.elevation, z)
    u_b, v_top = cam.project(o.x + o.width / 2, o.elevation + o.height, z)
    w = int(round(max(u_a, u_b))) - int(round(min(u_a, u_b)))
    h = int(round(v_bottom)) - int(round(v_top))
    return float(max(w, 0) * max(h, 0))


MotRow = tuple[int, int, float, float, float, float, int, float]  # frame, id, x, y, w, h, class, visibility


def write_mot_gt(path: Path, rows: list[MotRow]) -> None:
    """One camera's ground truth as MOTChallenge text (the MOT16/17 ``gt.txt`` layout), a line
    per box, sorted by frame then id:

        frame,id,bb_left,bb_top,bb_width,bb_height,conf,class,visibility

    frame: the image's ``sequence`` + 1 (MOTChallenge counts frames from 1); id: the
    annotation's ``track_id``; the box: gt.json's ``bbox`` in pixels, its x and y plus 1
    (MOTChallenge counts pixels from 1, and its readers, motmetrics' among them, take the 1
    off again); conf: 1 (every box is scored); class:
    gt.json's ``category_id`` (the drive's own classes, not MOTChallenge's class numbers);
    visibility: in [0, 1], the label box's area over the area of the object's whole projected
    box, so occlusion and the image edge lower it (a box-level estimate, as MOTChallenge's is;
    sprites do not quite fill their box, so an object in full view reads a little under 1).
    """
    lines = [f"{f},{t},{x:.2f},{y:.2f},{w:.2f},{h:.2f},1,{c},{v:.3f}\n" for f, t, x, y, w, h, c, v in sorted(rows)]
    path.write_text("".join(lines))


def write_drive(
    out_dir: str | os.PathLike[str], cameras: list[str], frames: int, fps: float = 10.0, seed: int = 0,
    width: int = 960, height: int = 540, jpeg_quality: int = 80, write_mp4: bool = True,
    traffic: Traffic | None = None,
) -> Path:
    """Render and write a recorded drive (see the module docstring). Returns ``out_dir``.

    traffic: how busy the road is (default ``Traffic()``: what drives always had).
    """
    from mcap_ros2.writer import Writer as Ros2Writer

    if frames <= 0 or fps <= 0:
        raise ConfigError(f"frames and fps must be positive, got {frames}, {fps}")
    traffic = traffic or Traffic()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cams = {name: _camera(name, width, height) for name in cameras}
    probe = next(iter(cams.values()))
    world = drive_world(rng, frames / fps, probe, traffic.density)
    if traffic.crossings_per_min > 0:
        # Their own stream (seeded from the drive's seed): crossings add to a drive and change nothing else in it.
        world += crossing_pairs(np.random.default_rng([seed, 1]), frames / fps, probe, traffic.crossings_per_min,
                                sorted({c.facing for c in cams.values()}), len(world) + 1)
    look = replace(Look.random(rng), blur_sigma=0.0, motion_blur=0, noise_sigma=float(rng.uniform(1.0, 2.5)), shadows=0)
    images: list[dict[str, Any]] = []  # COCO images and annotations
    anns: list[dict[str, Any]] = []
    mot_rows: dict[str, list[MotRow]] = {name: [] for name in cameras}
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
            by_track = {o.track_id: o for o in moved}
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
                    whole = _projected_area(by_track[tr], cam, ego_z)
                    visibility = min(1.0, bw * bh / whole) if whole > 0 else 0.0
                    mot_rows[name].append((seq + 1, tr, b[0] + 1, b[1] + 1, bw, bh, int(c) + 1, visibility))
        mw.finish()
    for w in writers.values():
        w.release()
    info: dict[str, Any] = {"description": "generated recorded drive", "fps": fps, "cameras": cameras, "seed": seed}
    if traffic != Traffic():  # only then: a drive with the default traffic is written as it always was
        info["traffic"] = asdict(traffic)
    gt = {"info": info, "images": images, "annotations": anns,
          "categories": [{"id": i + 1, "name": n} for i, n in enumerate(DEFAULT_CLASSES)]}
    (root / "gt.json").write_text(json.dumps(gt))
    for name, rows in mot_rows.items():
        write_mot_gt(root / f"gt_mot_{name}.txt", rows)
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
