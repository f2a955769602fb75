"""Generated datasets, COCO / YOLO readers and writers, recorded drives, and bad input."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from build_engine.data.formats import read_coco_set, read_labelled_set, read_yolo_set
from build_engine.data.generate import generate_dataset
from build_engine.data.scene import random_image
from build_engine.model.config import DEFAULT_CLASSES
from perception.errors import DataError


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("ds"), 12, seed=5, width=320, height=192)


def test_generated_dataset_layout_and_labels(small_set) -> None:
    assert (small_set / "annotations.json").is_file() and (small_set / "classes.txt").is_file()
    assert len(list((small_set / "images").glob("*.jpg"))) == 12 == len(list((small_set / "labels").glob("*.txt")))
    ds = read_labelled_set(small_set)
    assert ds.classes == DEFAULT_CLASSES and len(ds) == 12
    boxes = np.concatenate([s.boxes for s in ds.samples])
    assert len(boxes) > 24
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 320).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 192).all()
    assert ((boxes[:, 2] - boxes[:, 0]) >= 4).all() and ((boxes[:, 3] - boxes[:, 1]) >= 4).all()


def test_all_classes_and_many_small_objects() -> None:
    classes, heights = set(), []
    for i in range(40):
        r = random_image(1000 + i, 640, 360)
        classes.update(r.class_ids.tolist())
        heights += (r.boxes[:, 3] - r.boxes[:, 1]).tolist()
    assert classes == set(range(7))
    h = np.array(heights)
    assert (h < 32).mean() > 0.4 and (h > 64).any()  # many small far objects, and some near


def test_min_object_px_places_objects_farther() -> None:
    # The default floor (11-16 px by class) keeps road users, lights and signs over ~10 px; a
    # lower floor puts far ones in the images, and the default images are the same as before.
    def heights(min_px: float) -> np.ndarray:
        return np.concatenate([np.diff(random_image(2000 + i, 640, 360, min_px).boxes[:, 1::2], axis=1)[:, 0]
                               for i in range(60)])

    default, far = heights(0.0), heights(6.0)
    assert (default < 9).mean() < 0.05
    assert (far < 9).mean() > 0.2 and (far >= 5).mean() > 0.97 and (far > 64).any()
    # The default draws what it drew before the floor was a parameter (its random numbers are
    # drawn in the same order): these labels were generated then.
    r = random_image(8, 320, 192)
    assert r.class_ids.tolist() == [1, 1, 2, 0, 0, 0, 0, 0]
    assert np.round(r.boxes).astype(int).tolist() == [
        [119, 86, 131, 100], [178, 86, 187, 100], [150, 82, 178, 113], [210, 97, 233, 119], [121, 99, 136, 124],
        [160, 100, 189, 127], [90, 97, 127, 128], [181, 100, 228, 139]]


@pytest.mark.parametrize("value", [1.0, -3.0, 16.0, 65.0, True, float("nan"), "6"])
def test_min_object_px_config_bounds(value) -> None:
    from build_engine.config import DataConfig
    from perception.errors import ConfigError

    with pytest.raises(ConfigError, match="min_object_px"):
        DataConfig(min_object_px=value)


def test_min_object_px_accepted_values_and_where_it_does_nothing(tmp_path, capsys) -> None:
    from build_engine.config import DataConfig
    from perception.cli import main
    from perception.errors import ConfigError

    for value in (0, 0.0, 2, 6, 15.5):
        assert DataConfig(min_object_px=value).min_object_px == value
    with pytest.raises(ConfigError, match="does nothing with data.train_dir"):
        DataConfig(min_object_px=6, train_dir=str(tmp_path), val_dir=str(tmp_path))
    assert main(["gen-data", "--drive", "--out", str(tmp_path / "d"), "--min-object-px", "6"]) == 1
    assert "--min-object-px is for still images" in capsys.readouterr().err
    assert main(["gen-data", "--out", str(tmp_path / "g"), "--images", "1", "--min-object-px", "20"]) == 1
    assert "--min-object-px must be 0" in capsys.readouterr().err


def test_min_object_px_cache_and_hash(tmp_path, repo_root) -> None:
    from build_engine.config import load_config
    from build_engine.data.generate import cached_dataset

    # A config that leaves the floor alone keeps the hash it had before the field existed.
    recipe = repo_root / "configs" / "default.yaml"
    assert load_config(recipe).hash() == "91521771832f6a2e"
    assert load_config(recipe, ["data.min_object_px=6"]).hash() != "91521771832f6a2e"
    root = cached_dataset(tmp_path, "val", 2, 5, 160, 96, min_object_px=6)
    assert root.name == "val-s5-n2-160x96-far6l2" and (root / ".complete").is_file()
    assert cached_dataset(tmp_path, "val", 2, 5, 160, 96).name == "val-s5-n2-160x96"


def test_far_objects_drawn_are_labelled_down_to_two_pixels() -> None:
    """Objects placed down to a few pixels tall were labelled only with both sides of 4 px or
    more: a pedestrian drawn 6 px tall (2.4 px wide) was taught as background (76 of 435
    objects at min_object_px 6). Far data labels sides down to 2 px; default data is as it was."""
    from build_engine.data.scene import FAR_MIN_LABEL_PX, MIN_LABEL_PX, random_image

    def sides(min_px: float) -> np.ndarray:
        boxes = np.concatenate([random_image(seed, 640, 360, min_px).boxes for seed in range(20)])
        return np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])

    far, default = sides(3.0), sides(0.0)
    assert far.min() >= FAR_MIN_LABEL_PX and (far < MIN_LABEL_PX).sum() >= 10
    assert default.min() >= MIN_LABEL_PX


def test_generation_is_deterministic(tmp_path) -> None:
    a, b = random_image(42, 320, 192), random_image(42, 320, 192)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.image, random_image(43, 320, 192).image)


def test_boxes_fit_visible_pixels() -> None:
    # Render each object alone and the empty scene: the label box must be the bounding box of
    # the changed pixels (within 1 px: anti-aliased fringe pixels with alpha < 0.5 change the
    # image but are not part of the object).
    from dataclasses import replace

    from build_engine.data import scene

    rng = np.random.default_rng(7)
    cam = scene.random_camera(rng, 320, 192)
    # (lights and signs stand on an unlabelled pole, which would change pixels below the box)
    objs = [o for o in scene.random_scene(rng, cam, 10, 10)
            if o.labelled and o.kind not in ("traffic_light", "traffic_sign")]
    look = replace(scene.Look.random(rng), noise_sigma=0.0, blur_sigma=0.0, motion_blur=0)
    empty = scene.render([], cam, look).image.astype(int)
    checked = 0
    for o in objs:
        r = scene.render([o], cam, look)
        if len(r.boxes) != 1:
            continue
        ys, xs = np.nonzero(np.abs(scene.render([o], cam, look).image.astype(int) - empty).sum(-1) > 0)
        x1, y1, x2, y2 = r.boxes[0]
        assert xs.min() - 1 <= x1 <= xs.min() + 1 and xs.max() <= x2 <= xs.max() + 2
        assert ys.min() - 1 <= y1 <= ys.min() + 1 and ys.max() <= y2 <= ys.max() + 2
        checked += 1
    assert checked >= 3
    # Occlusion: a car right in front of another shrinks the far car's box to its visible part.
    # The near car's left edge (0.87 m at 15 m) lines up with the far car's centre (1.75 m at 30 m).
    far = scene.WorldObject("car", 1.75, 30.0, 1.8, 1.5, style=1, track_id=1)
    near = scene.WorldObject("car", 1.77, 15.0, 1.8, 1.5, style=2, track_id=2)
    alone = scene.render([far], cam, look).boxes[0]
    both = scene.render([far, near], cam, look)
    assert 1 in both.track_ids and 2 in both.track_ids
    far_box = both.boxes[both.track_ids.index(1)]
    assert far_box[0] == alone[0] and far_box[2] < alone[2]


def test_coco_and_yolo_readers_agree(small_set) -> None:
    a, b = read_coco_set(small_set), read_yolo_set(small_set)
    assert a.classes == b.classes
    for sa, sb in zip(sorted(a.samples, key=lambda s: s.file.name), b.samples, strict=True):
        assert sa.file.name == sb.file.name and (sa.width, sa.height) == (sb.width, sb.height)
        np.testing.assert_allclose(sa.boxes, sb.boxes, atol=0.02)
        assert sa.class_ids.tolist() == sb.class_ids.tolist()


def yolo_copy(src, tmp_path):
    dst = tmp_path / "y"
    shutil.copytree(src, dst)
    (dst / "annotations.json").unlink()
    return dst


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("9 0.5 0.5 0.1 0.1", "class id 9 out of range"),
        ("0 0.5 0.5 0.1", "malformed YOLO line"),
        ("x 0.5 0.5 0.1 0.1", "malformed"),
        # Pixels for fractions: every box was clipped away in training, which ran on no objects.
        ("0 64 48 32 24", "pixels?"),
    ],
)
def test_bad_yolo_lines_name_file_and_line(small_set, tmp_path, line, fragment) -> None:
    d = yolo_copy(small_set, tmp_path)
    lf = d / "labels" / "000003.txt"
    lf.write_text(lf.read_text() + line + "\n")
    with pytest.raises(DataError) as ei:
        read_labelled_set(d)
    assert f"{lf}:" in str(ei.value) and fragment in str(ei.value)


def test_a_label_file_that_is_not_text_is_named(small_set, tmp_path) -> None:
    """It was a bare codec error ("'utf-8' codec can't decode byte 0xff"), no file named."""
    d = yolo_copy(small_set, tmp_path)
    lf = d / "labels" / "000003.txt"
    lf.write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    with pytest.raises(DataError, match=f"{lf}: the label file is not UTF-8 text"):
        read_labelled_set(d)
    lf.write_bytes(b"\xef\xbb\xbf0 0.5 0.5 0.1 0.1\n")  # a byte-order mark is no part of the class id
    (sample,) = [s for s in read_labelled_set(d).samples if s.file.stem == "000003"]
    assert sample.class_ids.tolist() == [0]


def test_undecodable_image_and_orphan_label(small_set, tmp_path) -> None:
    d = yolo_copy(small_set, tmp_path)
    (d / "images" / "000002.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DataError, match="000002.jpg: image does not decode"):
        read_labelled_set(d)
    d2 = yolo_copy(small_set, tmp_path / "b")
    (d2 / "images" / "000004.jpg").unlink()
    with pytest.raises(DataError, match="000004.txt: label file has no image"):
        read_labelled_set(d2)


def test_two_images_of_one_name_are_refused_not_given_one_label_file(small_set, tmp_path) -> None:
    """a.jpg and a.png both map to labels/a.txt: one image's boxes were taught for the other."""
    import cv2

    d = yolo_copy(small_set, tmp_path)
    img = cv2.imread(str(d / "images" / "000002.jpg"))
    assert img is not None
    cv2.imwrite(str(d / "images" / "000002.png"), cv2.flip(img, 1))
    with pytest.raises(DataError, match="000002.jpg and 000002.png share the label file labels/000002.txt"):
        read_labelled_set(d)


def test_missing_or_empty_dataset(tmp_path) -> None:
    with pytest.raises(DataError, match="no such dataset"):
        read_labelled_set(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither annotations.json"):
        read_labelled_set(tmp_path / "empty")


def test_coco_set_missing_image_is_named(small_set, tmp_path) -> None:
    d = tmp_path / "c"
    shutil.copytree(small_set, d)
    (d / "images" / "000001.jpg").unlink()
    with pytest.raises(DataError, match="000001.jpg"):
        read_labelled_set(d)


def test_recorded_drive(tmp_path) -> None:
    from mcap_ros2.reader import read_ros2_messages

    from build_engine.data.drive import write_drive

    out = write_drive(tmp_path / "drive", ["front", "rear"], frames=4, fps=10, seed=1, width=320, height=192)
    gt = json.loads((out / "gt.json").read_text())
    assert len(gt["images"]) == 8 and [c["name"] for c in gt["categories"]] == list(DEFAULT_CLASSES)
    msgs = list(read_ros2_messages(str(out / "drive.mcap")))
    assert [m.channel.topic for m in msgs[:2]] == ["/cameras/front/image/compressed", "/cameras/rear/image/compressed"]
    stamps = [m.ros_msg.header.stamp.sec * 10**9 + m.ros_msg.header.stamp.nanosec for m in msgs]
    assert stamps == sorted(stamps)
    by_key = {(im["camera_id"], im["sequence"]): im for im in gt["images"]}
    for m, ts in zip(msgs, stamps, strict=True):
        cam = m.ros_msg.header.frame_id
        seq = [s for (c, s), im in by_key.items() if c == cam and im["timestamp_ns"] == ts]
        assert len(seq) == 1
        im = by_key[(cam, seq[0])]
        assert im["file_name"] == f"{cam}/{seq[0]:06d}.jpg" and m.ros_msg.format == "jpeg"
        img = cv2.imdecode(np.frombuffer(bytes(m.ros_msg.data), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.shape == (192, 320, 3)
    assert sorted(s for c, s in by_key if c == "rear") == [0, 1, 2, 3]
    cap = cv2.VideoCapture(str(out / "front.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    # Consistent motion: a tracked object moves by a small amount from one frame to the next.
    tracks: dict[tuple[str, int], list[tuple[int, list[float]]]] = {}
    id_to_im = {im["id"]: im for im in gt["images"]}
    for a in gt["annotations"]:
        im = id_to_im[a["image_id"]]
        tracks.setdefault((im["camera_id"], a["track_id"]), []).append((im["sequence"], a["bbox"]))
    steps = []
    for obs in tracks.values():
        obs.sort()
        steps += [abs(b[1][0] - a[1][0]) for a, b in itertools.pairwise(obs) if b[0] == a[0] + 1]
    assert steps and np.median(steps) < 20
    # The drive as a COCO dataset (exact JPEG bytes from the MCAP), readable like any other.
    from build_engine.data.drive import extract_frames

    ds = read_labelled_set(extract_frames(out, tmp_path / "frames"))
    assert len(ds) == 8 and sum(len(s.boxes) for s in ds.samples) == len(gt["annotations"])


def test_bundled_drive_is_small_and_valid(repo_root) -> None:
    d = repo_root / "assets" / "drives" / "demo"
    total = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    assert total < 5 * 2**20
    gt = json.loads((d / "gt.json").read_text())
    cams = {im["camera_id"] for im in gt["images"]}
    assert cams == {"front", "rear"} and len(gt["images"]) >= 100 and len(gt["annotations"]) > 500
    assert (d / "front.mp4").is_file() and (d / "drive.mcap").is_file()


def test_gen_data_cli(tmp_path, capsys) -> None:
    from perception.cli import main

    argv = ["gen-data", "--out", str(tmp_path / "g"), "--images", "3", "--seed", "4",
            "--width", "160", "--height", "96"]
    assert main(argv) == 0
    assert len(json.loads((tmp_path / "g" / "annotations.json").read_text())["images"]) == 3
    capsys.readouterr()
    assert main(["gen-data", "--drive", "--out", str(tmp_path / "d"), "--cameras", "left", "--frames", "2"]) == 1
    err = capsys.readouterr().err
    assert "unknown camera 'left'" in err and "Traceback" not in err


def test_training_reads_an_image_in_its_stored_orientation(tmp_path: Path) -> None:
    """The server decodes frames as stored, and labels' sizes are read so; cv2's IMREAD_COLOR
    applied an EXIF orientation tag, so a tagged photo trained rotated pixels under unrotated
    boxes."""
    import numpy as np
    from PIL import Image

    from build_engine.data.formats import read_image
    from perception.decode import decode_encoded

    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:10, :10] = 255  # a white block top-left, as stored
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotated 180 degrees
    path = tmp_path / "tagged.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    img = read_image(path)
    assert img.shape == (40, 60, 3) and img[:10, :10].mean() > 200 and img[-10:, -10:].mean() < 50
    served, _, _ = decode_encoded(path.read_bytes())
    assert np.abs(served.astype(int) - img.astype(int)).mean() < 2
