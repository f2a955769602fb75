"""Every source format, read from small recordings the tests write themselves."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from client.frames import SourceFrame
from client.sources import open_source
from client.sources.base import SourceOptions
from client.sources.mcap_source import McapSource
from perception.decode import PixelFormat, decode_encoded, decode_raw
from perception.errors import DataError
from tests.client import recordings as R


def _pixels(f: SourceFrame) -> np.ndarray:
    if f.encoded is not None:
        return decode_encoded(f.encoded)[0]
    assert f.raw is not None
    return decode_raw(f.raw.data, f.raw.width, f.raw.height, int(f.raw.pixel_format), f.raw.row_stride)


def _check_order(frames: list[SourceFrame]) -> None:
    ts = [f.timestamp_ns for f in frames]
    assert ts == sorted(ts), "frames must come in timestamp order across cameras"
    per_cam: dict[str, list[int]] = {}
    for f in frames:
        per_cam.setdefault(f.camera_id, []).append(f.sequence)
    for seqs in per_cam.values():
        assert seqs == list(range(len(seqs))), "sequences start at 0 and count up per camera"


def test_mp4_video_raw_and_jpeg(tmp_path: Path) -> None:
    path = R.write_mp4(tmp_path / "front.mp4", n=8, fps=20.0)
    src = open_source(path)
    frames = list(src)
    assert len(frames) == 8 and {f.camera_id for f in frames} == {"front"}
    _check_order(frames)
    assert frames[1].timestamp_ns - frames[0].timestamp_ns == 50_000_000  # 20 fps
    assert frames[0].raw is not None and frames[0].raw.pixel_format is PixelFormat.BGR8
    assert (frames[0].raw.width, frames[0].raw.height) == (96, 64)
    # The decoded video frame looks like the scene that was written (lossy codec: loose bound).
    assert np.abs(_pixels(frames[3]).astype(int) - R.scene(3).astype(int)).mean() < 12
    jpeg = list(open_source(path, SourceOptions(encode="jpeg", camera="cam0")))
    assert jpeg[0].encoded is not None and jpeg[0].encoded[:2] == b"\xff\xd8" and jpeg[0].camera_id == "cam0"


def test_avi_video(tmp_path: Path) -> None:
    path = tmp_path / "rear.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (64, 48))
    for i in range(4):
        vw.write(R.scene(i, 64, 48))
    vw.release()
    frames = list(open_source(path))
    assert [f.sequence for f in frames] == [0, 1, 2, 3] and frames[0].camera_id == "rear"


def test_image_folder_flat_sends_jpeg_bytes_as_is(tmp_path: Path) -> None:
    root = R.write_folder(tmp_path / "cam", n=4)
    frames = list(open_source(root, SourceOptions(fps=5.0)))
    assert [f.file_name for f in frames] == [f"{i:06d}.jpg" for i in range(4)]
    assert frames[2].encoded == (root / "000002.jpg").read_bytes()
    assert frames[1].timestamp_ns == 200_000_000


def test_image_folder_cameras_and_timestamps(tmp_path: Path) -> None:
    root = R.write_folder(tmp_path / "drive", cameras=("left", "right"), n=3)
    (root / "left" / "timestamps.txt").write_text("\n".join(str(1000 + 30 * i) for i in range(3)))
    (root / "right" / "timestamps.txt").write_text("\n".join(f"{i:06d}.jpg {1010 + 30 * i}" for i in range(3)))
    frames = list(open_source(root))
    _check_order(frames)
    assert [(f.camera_id, f.timestamp_ns) for f in frames[:3]] == [("left", 1000), ("right", 1010), ("left", 1030)]
    assert frames[0].file_name == "left/000000.jpg"


def test_image_folder_unpadded_numbers_play_in_number_order(tmp_path: Path) -> None:
    """``ffmpeg ... %d.jpg`` writes 1.jpg ... 12.jpg: sorted as text they played 1, 10, 11, 12, 2."""
    root = tmp_path / "cam"
    root.mkdir()
    for i in (1, 2, 10, 11, 12, 3):
        cv2.imwrite(str(root / f"{i}.jpg"), R.scene(i))
    frames = list(open_source(root, SourceOptions(fps=10.0)))
    assert [f.file_name for f in frames] == [f"{i}.jpg" for i in (1, 2, 3, 10, 11, 12)]
    assert [f.sequence for f in frames] == list(range(6))


def test_image_folder_bad_timestamps_file(tmp_path: Path) -> None:
    root = R.write_folder(tmp_path / "cam", n=3)
    (root / "timestamps.txt").write_text("1\n2\n")
    with pytest.raises(DataError, match="2 timestamps for 3 images"):
        open_source(root)


def test_image_folder_bmp_is_sent_raw(tmp_path: Path) -> None:
    root = tmp_path / "bmp"
    root.mkdir()
    cv2.imwrite(str(root / "a.bmp"), R.scene(0))
    (f,) = list(open_source(root))
    assert f.raw is not None and np.array_equal(_pixels(f), R.scene(0))


def test_mcap_ros2_compressed_and_raw_cameras_in_sync(tmp_path: Path) -> None:
    path = R.write_mcap_ros2(tmp_path / "drive.mcap", cameras=("front", "rear"), n=5, raw_camera="rear")
    src = open_source(path)
    assert isinstance(src, McapSource)
    assert set(src.topics) == {"/cameras/front/image/compressed", "/cameras/rear/image_raw"}
    frames = list(src)
    assert len(frames) == 10
    _check_order(frames)
    front = [f for f in frames if f.camera_id == "front"]
    rear = [f for f in frames if f.camera_id == "rear"]
    assert front[0].encoded is not None and front[0].timestamp_ns == R.T0_NS
    assert rear[0].raw is not None and rear[0].raw.pixel_format is PixelFormat.RGB8
    assert np.array_equal(_pixels(rear[2]), R.scene(2, seed=1))  # raw pixels survive exactly
    only = list(open_source(path, SourceOptions(topics=("/cameras/rear/image_raw",))))
    assert {f.camera_id for f in only} == {"rear"}


def _write_mcap(path: Path, topics: dict[str, tuple[str, str]], n: int = 3) -> Path:
    """ROS 2 MCAP of ``n`` captures: topic -> (frame_id, "jpeg" | "rgb8" | "16UC1")."""
    from mcap_ros2.writer import Writer

    with open(path, "wb") as f:
        w = Writer(f)
        comp = w.register_msgdef("sensor_msgs/msg/CompressedImage", R.COMPRESSED_DEF)
        raw = w.register_msgdef("sensor_msgs/msg/Image", R.IMAGE_DEF)
        for i in range(n):
            for k, (topic, (frame_id, kind)) in enumerate(topics.items()):
                ts = R.T0_NS + i * 100_000_000 + k * 1000
                header = {"header": {"stamp": R._stamp(ts), "frame_id": frame_id}}
                if kind == "jpeg":
                    w.write_message(topic, comp, {**header, "format": "jpeg", "data": R.jpeg(R.scene(i))}, log_time=ts)
                else:
                    depth = kind == "16UC1"
                    data = np.zeros((64, 96), np.uint16).tobytes() if depth else R.scene(i)[:, :, ::-1].tobytes()
                    w.write_message(topic, raw, {**header, "height": 64, "width": 96, "encoding": kind,
                                                 "is_bigendian": 0, "step": 96 * (2 if depth else 3), "data": data},
                                    log_time=ts)
        w.finish()
    return path


def test_mcap_topics_sharing_a_frame_id_are_two_cameras(tmp_path: Path) -> None:
    """A camera's raw and compressed topics carry one frame_id: they were merged into one camera,
    every capture sent twice, sequences interleaved (0, 1 at one capture time)."""
    path = _write_mcap(tmp_path / "d.mcap", {"/camera/image_raw": ("camera_optical_frame", "rgb8"),
                                             "/camera/image_raw/compressed": ("camera_optical_frame", "jpeg")})
    frames = list(open_source(path))
    by_camera: dict[str, list[tuple[int, int]]] = {}
    for f in frames:
        by_camera.setdefault(f.camera_id, []).append((f.sequence, f.timestamp_ns - R.T0_NS))
    assert by_camera == {"camera_optical_frame": [(0, 0), (1, 100_000_000), (2, 200_000_000)],
                         "camera_image_raw_compressed": [(0, 1000), (1, 100_001_000), (2, 200_001_000)]}


def test_a_depth_topic_is_left_out_unless_chosen(tmp_path: Path) -> None:
    """A depth camera's 16UC1 topic beside the colour one ended the whole replay after the first
    frame ("unsupported image encoding"). Left out with a warning; chosen by name, it is an error."""
    # Aligned depth shares the colour camera's frame_id, and its messages come first.
    path = _write_mcap(tmp_path / "rs.mcap", {"/camera/depth/image_rect_raw": ("color", "16UC1"),
                                              "/camera/color/image_raw/compressed": ("color", "jpeg")})
    frames = list(open_source(path))
    assert [(f.camera_id, f.sequence) for f in frames] == [("color", 0), ("color", 1), ("color", 2)]
    depth_only = _write_mcap(tmp_path / "depth.mcap", {"/camera/depth/image_rect_raw": ("depth", "16UC1")})
    with pytest.raises(DataError, match="no image messages.*unsupported image encoding"):
        list(open_source(depth_only))
    with pytest.raises(DataError, match="unsupported image encoding '16UC1'"):
        list(open_source(path, SourceOptions(topics=("/camera/depth/image_rect_raw",))))


@pytest.mark.parametrize("encoding", ["json", "cdr", "protobuf"])
def test_mcap_foxglove_compressed_image(tmp_path: Path, encoding: str) -> None:
    path = R.write_mcap_foxglove(tmp_path / "fox.mcap", n=3, encoding=encoding)
    frames = list(open_source(path))
    assert [(f.camera_id, f.sequence) for f in frames] == [("left", 0), ("left", 1), ("left", 2)]
    assert frames[1].timestamp_ns == R.T0_NS + 100_000_000
    assert frames[0].encoded is not None and decode_encoded(frames[0].encoded)[0].shape == (64, 96, 3)


@pytest.mark.parametrize("ros1,storage", [(True, ""), (False, "sqlite3"), (False, "mcap")],
                         ids=["ros1", "ros2-sqlite3", "ros2-mcap"])
def test_ros_bags(tmp_path: Path, ros1: bool, storage: str) -> None:
    path = R.write_bag(tmp_path / ("drive.bag" if ros1 else "drive_ros2"), ros1=ros1, n=4, storage=storage)
    src = open_source(path)
    assert type(src).__name__ == "BagSource"
    frames = list(src)
    assert len(frames) == 8
    _check_order(frames)
    side = [f for f in frames if f.camera_id == "side"]
    assert side[0].raw is not None and np.array_equal(_pixels(side[1]), R.scene(1, seed=1))
    front = [f for f in frames if f.camera_id == "front"]
    assert front[0].encoded is not None and front[0].encoded[:2] == b"\xff\xd8"


def test_unknown_topic_is_a_one_line_error(tmp_path: Path) -> None:
    path = R.write_mcap_ros2(tmp_path / "d.mcap", n=2)
    with pytest.raises(DataError, match=r"unknown topic '/nope'.*image topics: /cameras/front"):
        open_source(path, SourceOptions(topics=("/nope",)))
    bag = R.write_bag(tmp_path / "d.bag", ros1=True, n=2)
    with pytest.raises(DataError, match="unknown topic"):
        open_source(bag, SourceOptions(topics=("/nope",)))


def test_truncated_mcap_yields_what_is_readable_then_fails(tmp_path: Path) -> None:
    path = R.write_mcap_ros2(tmp_path / "full.mcap", cameras=("front",), n=30, chunk_size=4096)
    data = path.read_bytes()
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(data[: len(data) * 2 // 3])
    src = open_source(cut)
    got: list[SourceFrame] = []
    with pytest.raises(DataError, match="cut.mcap"):
        for f in src:
            got.append(f)
    assert 0 < len(got) < 30
    assert [f.sequence for f in got] == list(range(len(got)))


@pytest.mark.parametrize("name,content", [("junk.mcap", b"not an mcap at all"), ("junk.bag", b"#ROSBAG V2.0\ngarbage"),
                                          ("junk.mp4", b"\x00\x00\x00\x18ftypmp42 garbage")])
def test_unreadable_recordings(tmp_path: Path, name: str, content: bytes) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError, match=name):
        src = open_source(p)
        list(src)


def test_unknown_file_type_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown recording type"):
        open_source(tmp_path / "x.txt")
    with pytest.raises(DataError, match="no such file"):
        open_source(tmp_path / "missing.mcap")


def test_folder_of_videos_is_one_camera_per_file(tmp_path: Path) -> None:
    d = tmp_path / "drive"
    d.mkdir()
    R.write_mp4(d / "front.mp4", n=4, fps=10.0)
    R.write_mp4(d / "rear.mp4", n=3, fps=10.0)
    (d / "notes.json").write_text("{}")
    frames = list(open_source(d))
    assert [(f.camera_id, f.sequence) for f in frames] == [
        ("front", 0), ("rear", 0), ("front", 1), ("rear", 1), ("front", 2), ("rear", 2), ("front", 3)
    ]


def test_ros_mono16_images_short_or_without_last_padding() -> None:
    """A mono16 image whose bytes stop short is a DataError naming it (it was a ValueError that
    killed the reading thread); one whose last row leaves out its padding is read, as 8-bit
    images are."""
    from client.sources.images import ros_image_frame

    w, h, step = 4, 3, 10  # 8 bytes of pixels and 2 of padding per row
    img = np.arange(w * h, dtype=np.uint16).reshape(h, w) << 8
    rows = [img[r].tobytes() + b"\0\0" for r in range(h)]
    full = b"".join(rows)
    unpadded_last = full[:-2]
    got = ros_image_frame("front", 0, 0, "mono16", w, h, step, unpadded_last, "here")
    assert got.raw is not None
    bgr = np.frombuffer(got.raw.data, np.uint8).reshape(h, w, 3)
    assert np.array_equal(bgr[:, :, 0], (img >> 8).astype(np.uint8))
    with pytest.raises(DataError, match="here: mono16 image 4x3 \\(step 10\\) has only 15 bytes"):
        ros_image_frame("front", 0, 0, "mono16", w, h, step, full[:15], "here")


def test_frames_of_a_video_an_mcap_and_a_bag_have_no_made_up_file_name(tmp_path: Path) -> None:
    """Only an image folder's frames have files. The others were named "<camera>/<seq:06d>.jpg",
    which ground truth numbered from 1 has for the frame after: scored against the wrong frames."""
    for path in (R.write_mp4(tmp_path / "front.mp4", n=2), R.write_mcap_ros2(tmp_path / "d.mcap", n=2),
                 R.write_bag(tmp_path / "d.bag", ros1=True, n=2)):
        assert {f.file_name for f in open_source(path)} == {""}, path.name
    assert [f.file_name for f in open_source(R.write_folder(tmp_path / "cam", n=2))] == ["000000.jpg", "000001.jpg"]


def test_top_level_images_beside_camera_folders_are_refused(tmp_path: Path) -> None:
    """One preview.jpg beside front/ and rear/ made the drive one camera of one frame (exit 0)."""
    root = R.write_folder(tmp_path / "drive", cameras=("front", "rear"), n=3)
    cv2.imwrite(str(root / "preview.jpg"), R.scene(0))
    with pytest.raises(DataError, match=r"drive: images at the top \(preview.jpg\) and camera sub-folders of "
                                        r"images \(front, rear\) both"):
        open_source(root)


def test_videos_and_images_in_one_folder_are_refused(tmp_path: Path) -> None:
    """A screenshot in notes/ made a folder of videos an image folder of one frame."""
    d = tmp_path / "drive"
    d.mkdir()
    R.write_mp4(d / "front.mp4", n=2)
    R.write_mp4(d / "rear.mp4", n=2)
    (d / "notes").mkdir()
    cv2.imwrite(str(d / "notes" / "screenshot.jpg"), R.scene(0))
    with pytest.raises(DataError, match=r"videos \(front.mp4, rear.mp4\) and images \(notes/screenshot.jpg\) both"):
        open_source(d)


def test_two_videos_of_one_camera_id_are_refused(tmp_path: Path) -> None:
    """front.mp4 and front.avi were both camera "front": "already in flight", and a frame without a record."""
    d = tmp_path / "drive"
    d.mkdir()
    R.write_mp4(d / "front.mp4", n=2)
    R.write_mp4(d / "front.avi", n=2)
    R.write_mp4(d / "rear.mp4", n=2)
    with pytest.raises(DataError, match=r"front.avi and front.mp4 would both be camera 'front'"):
        open_source(d)


def test_a_timestamps_file_longer_than_the_folder_is_refused(tmp_path: Path) -> None:
    """Extra lines were cut silently: which line goes with which image is then anybody's guess."""
    root = R.write_folder(tmp_path / "cam", n=3)
    (root / "timestamps.txt").write_text("1\n2\n3\n4\n")
    with pytest.raises(DataError, match="4 timestamps for 3 images"):
        open_source(root)


def test_an_undecodable_or_empty_image_file_is_sent_as_it_is(tmp_path: Path) -> None:
    """As a damaged JPEG: the server answers it INVALID. It ended the folder's replay instead."""
    root = tmp_path / "cam"
    root.mkdir()
    for i in range(5):
        cv2.imwrite(str(root / f"{i:03d}.bmp"), R.scene(i))
    (root / "001.bmp").write_bytes(b"nope")
    (root / "003.bmp").write_bytes(b"")
    frames = list(open_source(root))
    assert [f.file_name for f in frames] == [f"{i:03d}.bmp" for i in range(5)]
    assert (frames[1].encoded, frames[3].encoded) == (b"nope", b"")
    assert frames[4].raw is not None and np.array_equal(_pixels(frames[4]), R.scene(4))


def _depth_only_bag(path: Path) -> Path:
    """A ROS 1 bag of one 16UC1 depth topic: image messages, none of them replayable."""
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS1_NOETIC)
    Header, Time = store.types["std_msgs/msg/Header"], store.types["builtin_interfaces/msg/Time"]
    Img = store.types["sensor_msgs/msg/Image"]
    with Writer(path) as w:
        conn = w.add_connection("/camera/depth/image_raw", Img.__msgtype__, typestore=store)
        for i in range(3):
            ts = R.T0_NS + i * 100_000_000
            msg = Img(header=Header(seq=i, stamp=Time(sec=ts // 10**9, nanosec=ts % 10**9), frame_id="depth"),
                      height=4, width=4, encoding="16UC1", is_bigendian=0, step=8,
                      data=np.zeros(32, np.uint8))
            w.write(conn, ts, store.serialize_ros1(msg, Img.__msgtype__))
    return path


def test_a_bag_without_a_replayable_image_is_an_error_as_an_mcap_is(tmp_path: Path) -> None:
    """It replayed 0 frames and exited 0, where the same recording as MCAP is a DataError."""
    bag = _depth_only_bag(tmp_path / "depth.bag")
    with pytest.raises(DataError, match="depth.bag: no image messages on /camera/depth/image_raw.*unsupported image "
                                        "encoding '16UC1'"):
        list(open_source(bag))
