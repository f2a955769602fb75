"""Ground-truth tracks of generated drives: a stable track id per object, the same tracks as
MOTChallenge text, busier drives with crossing and occluded road users, and defaults that still
draw the bundled demo drive."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from build_engine.data.drive import Traffic, _camera, crossing_pairs, drive_world, write_drive
from perception.errors import ConfigError

CAMERAS = ["front", "rear"]
SEED, SECONDS, FPS, WIDTH, HEIGHT = 2, 12, 10, 480, 270
BUSY = Traffic(density=2.0, crossings_per_min=20.0)  # 4 crossing pairs in 12 s


@pytest.fixture(scope="module")
def busy_drive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_drive(tmp_path_factory.mktemp("busy"), CAMERAS, SECONDS * FPS, FPS, SEED, WIDTH, HEIGHT,
                       write_mp4=False, traffic=BUSY)


def _tracks(drive: Path) -> dict[tuple[str, int], dict[int, tuple[list[float], int]]]:
    """(camera, track id) -> {sequence: (COCO bbox, category id)}."""
    gt = json.loads((drive / "gt.json").read_text())
    images = {im["id"]: im for im in gt["images"]}
    out: dict[tuple[str, int], dict[int, tuple[list[float], int]]] = defaultdict(dict)
    for a in gt["annotations"]:
        im = images[a["image_id"]]
        track = out[(im["camera_id"], a["track_id"])]
        assert im["sequence"] not in track, f"track {a['track_id']} twice in {im['file_name']}"
        track[im["sequence"]] = (a["bbox"], a["category_id"])
    return out


def _mot_rows(drive: Path, camera: str) -> np.ndarray:
    return np.loadtxt(drive / f"gt_mot_{camera}.txt", delimiter=",", ndmin=2)


def _crossing_ids() -> set[int]:
    """Track ids of the crossing road users in the busy drive (drawn after the rest of the world)."""
    base = len(drive_world(np.random.default_rng(SEED), SECONDS, _camera("front", WIDTH, HEIGHT), BUSY.density))
    return set(range(base + 1, base + 1 + 2 * round(BUSY.crossings_per_min * SECONDS / 60)))


def test_every_annotation_has_a_stable_track_id(busy_drive: Path) -> None:
    gt = json.loads((busy_drive / "gt.json").read_text())
    assert gt["annotations"] and all(
        isinstance(a["track_id"], int) and a["track_id"] >= 1 for a in gt["annotations"]
    )
    assert gt["info"]["traffic"] == {"density": 2.0, "crossings_per_min": 20.0}
    tracks = _tracks(busy_drive)
    class_of: dict[int, set[int]] = defaultdict(set)
    for (_, tid), obs in tracks.items():
        class_of[tid] |= {cat for _, cat in obs.values()}
    assert all(len(c) == 1 for c in class_of.values()), "a track id changed class"
    # One object, one id in both cameras: something passes from one camera's view to the other's.
    assert {tid for cam, tid in tracks if cam == "front"} & {tid for cam, tid in tracks if cam == "rear"}
    # An id follows its object: from one frame to the next its box moves a few pixels, not across the image.
    steps = [abs(obs[s + 1][0][0] - obs[s][0][0]) for obs in tracks.values() for s in obs if s + 1 in obs]
    assert np.median(steps) < 5
    # Hidden for a while and seen again: the object keeps its id (what a tracker has to re-find).
    assert any(len(obs) < max(obs) - min(obs) + 1 for obs in tracks.values())


# motmetrics 1.4.0's reader subtracts a tuple from two columns, which pandas 3 warns about.
@pytest.mark.filterwarnings("ignore:Operation with tuple is deprecated")
def test_mot_text_holds_the_coco_tracks(busy_drive: Path) -> None:
    import motmetrics as mm  # type: ignore[import-untyped]  # ships no types

    tracks = _tracks(busy_drive)
    for cam in CAMERAS:
        rows = _mot_rows(busy_drive, cam)
        assert rows.shape[1] == 9
        keys = [(int(r[0]), int(r[1])) for r in rows]
        assert keys == sorted(keys), "rows sorted by frame, then id"
        expected = {(seq + 1, tid, *box, cat) for (c, tid), obs in tracks.items() if c == cam
                    for seq, (box, cat) in obs.items()}
        got = {(int(r[0]), int(r[1]), r[2] - 1, r[3] - 1, r[4], r[5], int(r[7])) for r in rows}
        assert got == expected and len(rows) == len(expected)
        assert (rows[:, 6] == 1).all()
        vis = rows[:, 8]
        assert ((vis >= 0) & (vis <= 1)).all() and np.median(vis) > 0.8 and (vis < 0.5).any()
        # The standard reader takes MOTChallenge's 1-based pixels back to gt.json's boxes.
        df = mm.io.loadtxt(str(busy_drive / f"gt_mot_{cam}.txt"), fmt="mot16")
        assert len(df) == len(rows)
        first = df.loc[(int(rows[0, 0]), int(rows[0, 1]))]
        assert [first["X"], first["Y"], first["Width"], first["Height"]] == pytest.approx(
            [rows[0, 2] - 1, rows[0, 3] - 1, rows[0, 4], rows[0, 5]])


def test_crossing_road_users_cross_and_are_hidden(busy_drive: Path) -> None:
    crossing = _crossing_ids()
    tracks = _tracks(busy_drive)
    assert crossing & {tid for _, tid in tracks}, "no crossing road user was ever in view"
    crossed = []
    for cam in CAMERAS:
        for a in sorted(crossing)[::2]:  # pairs are drawn together: ids (a, a + 1)
            ta, tb = tracks.get((cam, a), {}), tracks.get((cam, a + 1), {})
            both = sorted(set(ta) & set(tb))
            if not both:
                continue

            def centre(box: list[float]) -> float:
                return box[0] + box[2] / 2

            order = {np.sign(centre(ta[s][0]) - centre(tb[s][0])) for s in (both[0], both[-1])}
            overlap = any(_overlaps(ta[s][0], tb[s][0]) for s in both)
            crossed.append(order == {-1.0, 1.0} and overlap)
    assert any(crossed), "no pair's boxes met and swapped sides"
    # Occluded: a crossing road user's label box is under half of its whole box in some frame.
    vis = np.concatenate([_mot_rows(busy_drive, cam) for cam in CAMERAS])
    assert (vis[np.isin(vis[:, 1], sorted(crossing)), 8] < 0.5).any()


def _overlaps(a: list[float], b: list[float]) -> bool:
    return min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0]) and min(a[1] + a[3], b[1] + b[3]) > max(a[1], b[1])


def test_default_traffic_still_draws_the_bundled_demo(repo_root: Path, tmp_path: Path) -> None:
    # The command in assets/drives/demo/README.md, without the videos (gt.json does not depend on them).
    out = write_drive(tmp_path / "demo", ["front", "rear"], 60, 10.0, seed=3, jpeg_quality=70, write_mp4=False)
    bundled = repo_root / "assets" / "drives" / "demo" / "gt.json"
    assert (out / "gt.json").read_bytes() == bundled.read_bytes()
    gt = json.loads(bundled.read_text())
    for cam in ["front", "rear"]:
        ids = {im["id"] for im in gt["images"] if im["camera_id"] == cam}
        assert len(_mot_rows(out, cam)) == sum(a["image_id"] in ids for a in gt["annotations"])


def test_density_scales_the_world_and_crossings_only_add() -> None:
    cam = _camera("front", WIDTH, HEIGHT)
    base = drive_world(np.random.default_rng(0), 60, cam)
    assert [o.track_id for o in base] == list(range(1, len(base) + 1))
    same = drive_world(np.random.default_rng(0), 60, cam, 1.0)
    assert [(o.kind, o.x, o.z, o.vz) for o in same] == [(o.kind, o.x, o.z, o.vz) for o in base]
    busy = drive_world(np.random.default_rng(0), 60, cam, 4.0)
    movers = [o for o in base if o.vz and abs(o.z) > 40]  # not the lead and follower, which are not scaled
    busy_movers = [o for o in busy if o.vz and abs(o.z) > 40]
    assert 2.5 * len(movers) < len(busy_movers) < 5.5 * len(movers)
    pairs = crossing_pairs(np.random.default_rng(1), 60, cam, 6.0, [1, -1], first_id=101)
    assert len(pairs) == 12 and [o.track_id for o in pairs] == list(range(101, 113))
    for a, b in zip(pairs[::2], pairs[1::2], strict=True):
        assert a.vx * b.vx < 0 and a.vz == b.vz == 0, "a pair walks across the road, in opposite directions"
        # They meet: the same x at one moment.
        t = (b.x - a.x) / (a.vx - b.vx)
        assert 0 < t < 60 and math.isclose(a.x + a.vx * t, b.x + b.vx * t)


@pytest.mark.parametrize("kw", [{"density": -1.0}, {"crossings_per_min": math.nan}, {"density": True},
                                {"crossings_per_min": math.inf}])
def test_traffic_rejects_bad_values(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="Traffic"):
        Traffic(**kw)


def test_a_long_drive_can_be_as_busy_per_metre_as_the_demo() -> None:
    from build_engine.data.drive import EGO_SPEED, density_per_metre_like

    assert density_per_metre_like(6, 6) == pytest.approx(1.0)
    long = density_per_metre_like(180, 6)
    assert 9 < long < 12, long  # not 180 / 6 = 30: the stretches have fixed margins
    cam = _camera("front", WIDTH, HEIGHT)

    def movers_per_metre(seconds: float, density: float) -> float:
        # Pedestrians, cyclists and the outer and oncoming lanes' vehicles (what the density scales).
        worlds = [drive_world(np.random.default_rng(seed), seconds, cam, density) for seed in range(20)]
        n = sum(1 for w in worlds for o in w[2:] if o.kind not in ("traffic_light", "traffic_sign", "tree", "pole"))
        return n / len(worlds) / (EGO_SPEED * seconds + 150)

    ratio = movers_per_metre(180, long) / movers_per_metre(6, 1.0)
    assert 0.8 < ratio < 1.25, ratio
