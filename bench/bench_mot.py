"""Tracking quality end to end: generated drives replayed to the served default model with
tracking asked for, scored against the drives' ground-truth tracks (client.track_scoring).

Drives, generated into a temporary directory (seeded, so every run replays the same frames):

- ``demo``: the bundled drive's recipe (assets/drives/demo/README.md): front + rear, 6 s at
  10 fps, seed 3, JPEG quality 70.
- ``long``: front + rear, ``--long-seconds`` (default 180) at 10 fps, seed 11, traffic as busy
  per metre as the demo's (``Traffic.density`` from ``density_per_metre_like``: 10.6 for
  180 s; ``--long-density`` sets another) plus ``--crossings-per-min`` pairs of road users
  crossing the road and passing behind the vehicle in our lane. Until this was measured, the
  density was seconds / 6 (30 for 180 s), which the fixed margins of the stretches made about
  2.5 times as busy per metre as the demo: ``--long-density 30`` replays that drive.

Each drive is replayed twice over one StreamDetect to a server started here (in this process,
on a loopback port), at recorded pace with ``DetectOptions.track``: every frame, then every
other frame (half the frames dropped, as a camera at half rate; the tracker has to bridge
200 ms gaps, and only the frames sent are scored). Printed per run, over both cameras and per
camera: IDF1, MOTA, ID switches, fragmentations, precision, recall; then the half-rate run's
IDF1 and MOTA as ratios of the full-rate run's. Confirmed tracks are also scored with the
ground truth under ``--min-gt-height`` source pixels (16) as don't care (KITTI's convention):
the tracker on the objects a detector can see, beside the score over every box.

Tracker cost: the server reports none (no stage timing, no metric), so it is measured here on
the same input: each answered frame's detections and capture time go through a local
``perception.tracking.Tracker`` with the server's settings, one per camera, timing each update;
the ids it gives are checked against the server's (the same partition of the boxes into tracks).

Model: ``--model``, else artifacts/demo/engine/manifest.json, else one built with
``perception build --out DIR --no-report --no-scaling`` into the temporary directory.

Not a test: nothing is asserted. A 180 s drive takes about 5 minutes to generate and 6 to replay.

    .venv/bin/python -m bench.bench_mot [--long-seconds 180] [--crossings-per-min 6] [--model M.json]
        [--score-threshold 0] [--min-gt-height 16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "artifacts" / "demo" / "engine" / "manifest.json"
FPS = 10.0
DEMO_SECONDS, DEMO_SEED = 6, 3
LONG_SEED = 11

log = logging.getLogger("bench_mot")


@dataclass(frozen=True)
class Run:
    """One replay: what was sent and every answer, in arrival order."""

    drive: str
    rate: str  # "full" or "half"
    sent: int
    seconds: float
    answers: list[Any]  # perception.v1.DetectResponse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_mot", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--long-seconds", type=float, default=180.0, help="length of the long drive (default 180)")
    p.add_argument("--crossings-per-min", type=float, default=6.0, help="crossing pairs per minute in the long drive")
    p.add_argument("--long-density", type=float,
                   help="Traffic.density of the long drive (default: as busy per metre as the demo)")
    p.add_argument("--model", type=Path, help="manifest.json to serve (default: the shipped demo model)")
    p.add_argument("--score-threshold", type=float, default=0.0,
                   help="DetectOptions.score_threshold (default 0: the model's own)")
    p.add_argument("--threads", type=int, default=0, help="inference threads per batch of the server (default: "
                   "its own choice)")
    p.add_argument("--min-gt-height", type=float, default=16.0,
                   help="also score with ground truth under this many source pixels as don't care (KITTI's "
                        "convention; default 16); 0 leaves that table out")
    p.add_argument("--drives", type=Path, help="keep the generated drives under this directory and reuse them "
                   "on later runs with the same settings (the 180 s drive takes 5-13 minutes to generate); "
                   "default: a temporary directory")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    return p


def generate_drives(root: Path, long_seconds: float, crossings_per_min: float,
                    density: float | None = None) -> dict[str, Path]:
    from build_engine.data.drive import Traffic, density_per_metre_like, write_drive

    t0 = time.perf_counter()
    demo = write_drive(root / "demo", ["front", "rear"], int(DEMO_SECONDS * FPS), FPS, DEMO_SEED, jpeg_quality=70,
                       write_mp4=False)
    log.info("demo drive generated in %.0f s; generating the %.0f s drive", time.perf_counter() - t0, long_seconds)
    t0 = time.perf_counter()
    if density is None:
        density = density_per_metre_like(long_seconds, DEMO_SECONDS)
    traffic = Traffic(density=density, crossings_per_min=crossings_per_min)
    long = write_drive(root / "long", ["front", "rear"], int(round(long_seconds * FPS)), FPS, LONG_SEED,
                       write_mp4=False, traffic=traffic)
    log.info("long drive generated in %.0f s", time.perf_counter() - t0)
    return {"demo": demo, "long": long}


def cached_drives(cache: Path, long_seconds: float, crossings_per_min: float, density: float) -> dict[str, Path]:
    """The drives of these settings under ``cache``, generated there the first time (the drives
    are seeded: the same settings make the same frames)."""
    # The generator's code is part of the key: drives made by an older one are not reused.
    import hashlib

    import build_engine.data.drive as drive_code
    code = hashlib.sha256(Path(drive_code.__file__).read_bytes()).hexdigest()[:8]
    root = cache / f"long{long_seconds:g}s_crossings{crossings_per_min:g}_density{density:.4f}_{code}"
    done = root / "complete"
    if done.is_file():
        log.info("reusing the drives in %s", root)
        return {"demo": root / "demo", "long": root / "long"}
    if root.exists():
        shutil.rmtree(root)  # a generation cut short
    drives = generate_drives(root, long_seconds, crossings_per_min, density)
    done.write_text("")
    return drives


def model_manifest(arg: Path | None, root: Path) -> Path:
    if arg is not None:
        return arg
    if SHIPPED_MODEL.is_file():
        return SHIPPED_MODEL
    out = root / "model"
    log.info("no %s: building the default model into %s", SHIPPED_MODEL.relative_to(REPO), out)
    subprocess.run([sys.executable, "-m", "perception.cli", "build", "--out", str(out), "--no-report", "--no-scaling"],
                   check=True, cwd=REPO)
    return out / "manifest.json"


def replay(stub: Any, drive: Path, name: str, skip: int, score_threshold: float) -> Run:
    """Replay ``drive`` at recorded pace over one StreamDetect, tracking asked for; ``skip``
    frames of each camera left out after each one sent."""
    from client.convert import to_request
    from client.pacing import Pacing, paced
    from client.sources.base import SourceOptions
    from client.sources.mcap_source import McapSource

    source = McapSource(drive / "drive.mcap", SourceOptions())
    sent = 0

    def requests() -> Any:
        nonlocal sent
        for frame in paced(source, Pacing(speed=1.0, skip=skip)):
            req = to_request(frame)
            req.options.track = True
            req.options.score_threshold = score_threshold
            sent += 1
            yield req

    t0 = time.perf_counter()
    duration = len(json.loads((drive / "gt.json").read_text())["images"]) / FPS
    answers = list(stub.StreamDetect(requests(), timeout=duration + 120.0))
    return Run(drive.name, name, sent, time.perf_counter() - t0, answers)


def tracked_frames(run: Run) -> list[Any]:
    """The run's answered frames as client.track_scoring.TrackedFrame (track ids and states)."""
    from client.track_scoring import TrackedFrame
    from perception.tracking import TrackState
    from perception.v1 import detector_pb2 as pb

    states = {pb.TRACK_STATE_UNSPECIFIED: None, pb.TRACK_STATE_NEW: TrackState.NEW,
              pb.TRACK_STATE_CONFIRMED: TrackState.CONFIRMED, pb.TRACK_STATE_COASTING: TrackState.COASTING}
    out = []
    for a in run.answers:
        if a.status != pb.FRAME_STATUS_OK:
            continue
        d = list(a.detections)
        out.append(TrackedFrame(
            a.camera_id, int(a.sequence),
            np.array([[x.box.x1, x.box.y1, x.box.x2, x.box.y2] for x in d], np.float32).reshape(-1, 4),
            np.array([x.class_id for x in d], np.int64), np.array([x.track_id for x in d], np.int64),
            tuple(x.class_name for x in d), tuple(states[x.track_state] for x in d),
        ))
    return out


def detector_only(frames: list[Any]) -> list[Any]:
    """The same answered boxes with ids 1..N in each frame, whatever the object: scored, their
    precision and recall are the detector's, what a tracker starts from (MOTA <= recall); the
    identity figures mean nothing. (Ids unique over the drive would be exact too, but motmetrics'
    IDF1 step is quadratic in the number of ids: a 3-minute drive runs out of memory.)"""
    import dataclasses

    return [dataclasses.replace(f, track_ids=np.arange(1, len(f.track_ids) + 1, dtype=np.int64), track_states=())
            for f in frames]


# Ground-truth box height, source pixels. The shipped model sees a 960x540 drive frame at 0.53x:
# under 8 px is under about 4 px at its input, 8-16 px about 4-8 px (its training images hold
# nothing under about 8-13 px at its input).
HEIGHT_BUCKETS = ((0, 8), (8, 16), (16, 32), (32, 64), (64, 1 << 30))


def recall_by_height(frames: list[Any], gt_path: Path, iou: float = 0.5) -> list[dict[str, Any]]:
    """The detector's recall per ground-truth box height: each answered frame's boxes matched
    greedily (highest IoU first, same class, IoU >= ``iou``) to its ground truth. Says which
    objects a drive's misses are, and why: ``near_miss``, the share of a bucket's boxes left
    unmatched though a box of their class overlaps them (IoU 0.1 to ``iou``: found, but placed or
    sized wrong); ``height_ratio``, the median height of the best-overlapping box of the class
    over the ground truth's (over the boxes that have one, IoU >= 0.1)."""
    from perception.kpi import iou_matrix

    gt = json.loads(gt_path.read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    image_of = {(im["camera_id"], int(im["sequence"])): im["id"] for im in gt["images"]}
    boxes: dict[int, list[tuple[list[float], str]]] = {}
    for a in gt["annotations"]:
        boxes.setdefault(a["image_id"], []).append((a["bbox"], names[a["category_id"]]))
    found = [0] * len(HEIGHT_BUCKETS)
    total = [0] * len(HEIGHT_BUCKETS)
    near = [0] * len(HEIGHT_BUCKETS)
    ratios: list[list[float]] = [[] for _ in HEIGHT_BUCKETS]
    for f in frames:
        truth = boxes.get(image_of.get((f.camera_id, f.sequence), -1), [])
        gt_xyxy = np.array([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b, _ in truth], np.float64).reshape(-1, 4)
        ious = iou_matrix(f.boxes, gt_xyxy)  # (detections, ground truth)
        same_class = np.array([[d == name for _, name in truth] for d in f.class_names], bool).reshape(ious.shape)
        det, gti = np.nonzero(same_class & (ious >= iou))
        matched_gt, matched_det = set(), set()
        for k in sorted(range(len(det)), key=lambda k: -ious[det[k], gti[k]]):
            if gti[k] not in matched_gt and det[k] not in matched_det:
                matched_gt.add(gti[k])
                matched_det.add(det[k])
        class_ious = np.where(same_class, ious, 0.0)
        for i, (b, _) in enumerate(truth):
            k = next(k for k, (lo, hi) in enumerate(HEIGHT_BUCKETS) if lo <= b[3] < hi)
            total[k] += 1
            found[k] += i in matched_gt
            best = int(np.argmax(class_ious[:, i])) if len(class_ious) else -1
            if best >= 0 and class_ious[best, i] >= 0.1:
                near[k] += i not in matched_gt
                ratios[k].append(float(f.boxes[best, 3] - f.boxes[best, 1]) / max(b[3], 1e-6))
    n = sum(total)
    return [{"height_px": f"{lo}-{hi}" if hi < 1 << 30 else f">={lo}", "gt_boxes": t,
             "share": t / n if n else None, "recall": f / t if t else None,
             "near_miss": m / t if t else None, "height_ratio": float(np.median(r)) if r else None}
            for (lo, hi), t, f, m, r in zip(HEIGHT_BUCKETS, total, found, near, ratios, strict=True)]


def tracker_cost(run: Run) -> dict[str, float | bool]:
    """Time a local Tracker per camera on the run's answered detections; whether its tracks are
    the server's (the same boxes grouped into the same tracks, whatever the ids' numbers)."""
    from perception.tracking import Tracker, TrackerConfig
    from perception.types import Detections
    from perception.v1 import detector_pb2 as pb

    trackers: dict[str, Tracker] = {}
    times_ns: list[int] = []
    sizes: list[int] = []
    served_to_local: dict[tuple[str, int], int] = {}
    local_to_served: dict[tuple[str, int], int] = {}
    agree = True
    for a in run.answers:
        if a.status != pb.FRAME_STATUS_OK:
            continue
        d = list(a.detections)
        det = Detections(np.array([[x.box.x1, x.box.y1, x.box.x2, x.box.y2] for x in d], np.float32).reshape(-1, 4),
                         np.array([x.score for x in d], np.float32), np.array([x.class_id for x in d], np.int64))
        tracker = trackers.setdefault(a.camera_id, Tracker(TrackerConfig()))
        t0 = time.perf_counter_ns()
        result = tracker.update(det, int(a.capture_timestamp_ns), int(a.sequence))
        times_ns.append(time.perf_counter_ns() - t0)
        sizes.append(len(d))
        for served, local in zip((x.track_id for x in d), result.track_ids.tolist(), strict=True):
            if (served == 0) != (local == 0):
                agree = False
            elif served:
                key_s, key_l = (a.camera_id, int(served)), (a.camera_id, int(local))
                agree &= served_to_local.setdefault(key_s, local) == local
                agree &= local_to_served.setdefault(key_l, int(served)) == int(served)
    ms = np.asarray(times_ns, np.float64) / 1e6
    return {
        "frames": len(times_ns), "detections_per_frame": float(np.mean(sizes)) if sizes else 0.0,
        "update_p50_ms": float(np.percentile(ms, 50)) if ms.size else float("nan"),
        "update_p99_ms": float(np.percentile(ms, 99)) if ms.size else float("nan"),
        "tracks_match_server": agree,
    }


def _fmt(v: float | int | None, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def _score_table(rows: list[dict[str, Any]], key: str, per_camera: bool) -> None:
    print("| drive | rate | camera | frames sent | answered OK | GT tracks | IDF1 | MOTA | ID switches "
          "| fragmentations | precision | recall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r[key]
        for cam, sc in [("all", s["overall"]), *(s["cameras"].items() if per_camera else [])]:
            first = cam == "all"
            print(f"| {r['drive']} | {r['rate']} | {cam} | {r['sent'] if first else ''} "
                  f"| {r['answers'].get('FRAME_STATUS_OK', 0) if first else ''} | {sc['gt_tracks']} "
                  f"| {_fmt(sc['idf1'])} | {_fmt(sc['mota'])} | {sc['id_switches']} | {sc['fragmentations']} "
                  f"| {_fmt(sc['precision'])} | {_fmt(sc['recall'])} |")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # motmetrics logs its timings on the root logger at INFO: only this bench's progress is shown.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    if (args.long_seconds < 1 or args.crossings_per_min < 0 or not 0 <= args.score_threshold <= 1
            or (args.long_density is not None and args.long_density < 0) or not args.min_gt_height >= 0):
        print("bench_mot: --long-seconds must be >= 1, --crossings-per-min, --long-density and --min-gt-height "
              ">= 0, --score-threshold in [0, 1]", file=sys.stderr)
        return 2
    from build_engine.data.drive import density_per_metre_like

    density = (density_per_metre_like(args.long_seconds, DEMO_SECONDS) if args.long_density is None
               else args.long_density)
    import grpc

    from client.ground_truth import GroundTruthIndex
    from client.track_scoring import score_tracks
    from perception.v1 import detector_pb2 as pb
    from perception.v1 import detector_pb2_grpc as pb_grpc
    from server.app import create_server
    from server.config import ServerConfig

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_mot_") as tmp:
        root = Path(tmp)
        drives = cached_drives(args.drives, args.long_seconds, args.crossings_per_min, density) if args.drives \
            else generate_drives(root, args.long_seconds, args.crossings_per_min, density)
        manifest = model_manifest(args.model, root)
        for drive_name, drive in drives.items():
            gt = GroundTruthIndex.load(drive / "gt.json")
            for rate, skip in (("full", 0), ("half", 1)):
                # A server per run, each replay's tracks its own: before the client marked re-sent
                # frames (Frame.resent), one server's tracker answered the half-rate replay's frames,
                # the same frames as the full-rate one's, as re-sends of them (their first ids).
                # The tracker loaded at start, as a deployment that tracks from its first frame
                # has it: the first frames would otherwise wait for its load.
                server, port = create_server(ServerConfig(model=str(manifest), host="127.0.0.1", port=0,
                                                          threads=args.threads, preload_tracker=True))
                try:
                    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                        log.info("replaying %s at %s rate", drive_name, rate)
                        run = replay(pb_grpc.DetectorStub(channel), drive, rate, skip, args.score_threshold)
                finally:
                    server.shutdown(2.0)
                frames = tracked_frames(run)
                statuses = Counter(pb.FrameStatus.Name(a.status) for a in run.answers)
                rows.append({
                    "drive": drive_name, "rate": rate, "sent": run.sent, "answers": dict(statuses),
                    "replay_s": run.seconds, "scores": score_tracks(frames, gt).to_dict(),
                    "scores_confirmed": score_tracks(frames, gt, confirmed_only=True).to_dict(),
                    "scores_dont_care": (score_tracks(frames, gt, confirmed_only=True,
                                                      min_gt_height=args.min_gt_height).to_dict()
                                         if args.min_gt_height else None),
                    "detector": score_tracks(detector_only(frames), gt).to_dict(),
                    "recall_by_height": recall_by_height(frames, drive / "gt.json"),
                    "tracker": tracker_cost(run),
                })

    print(f"tracking on generated drives (long drive {args.long_seconds:.0f} s, traffic density {density:.2f}, "
          f"{args.crossings_per_min:g} crossings / min; model {manifest.parent.name}/{manifest.name})")
    print()
    print("every box with a track id scored (NEW tracks included)")
    _score_table(rows, "scores", per_camera=True)
    print()
    print("confirmed tracks only (boxes of NEW tracks left out, ByteTrack's output convention)")
    _score_table(rows, "scores_confirmed", per_camera=False)
    print()
    if args.min_gt_height:
        print(f"confirmed tracks, ground truth under {args.min_gt_height:g} px don't care (KITTI's convention: "
              "neither misses nor matches, and a box on one is no false positive); boxes left out of the "
              "ground truth / of the tracks:")
        _score_table(rows, "scores_dont_care", per_camera=False)
        for r in rows:
            d = r["scores_dont_care"]
            print(f"  {r['drive']} {r['rate']}: {d['dont_care_gt_boxes']} / {d['dont_care_detections']}")
        print()
    print("the detector alone (every answered box scored, no identities): MOTA <= its recall, whatever the tracker")
    print("| drive | rate | precision | recall | MOTA of every box (recall - false positives / GT) |")
    print("|---|---|---|---|---|")
    for r in rows:
        o = r["detector"]["overall"]
        ceiling = (o["true_positives"] - o["false_positives"]) / o["gt_boxes"] if o["gt_boxes"] else None
        print(f"| {r['drive']} | {r['rate']} | {_fmt(o['precision'])} | {_fmt(o['recall'])} | {_fmt(ceiling)} |")
    print()
    print("the detector's recall by ground-truth box height (source pixels; greedy IoU >= 0.5, same class); "
          "near miss: unmatched, but a box of its class overlaps it (IoU 0.1-0.5); height: the best-overlapping "
          "box's height / the ground truth's, median")
    print("| drive | rate | " + " | ".join(f"{r['height_px']} px: share, recall, near miss, height"
                                          for r in rows[0]["recall_by_height"]) + " |")
    print("|---|---|" + "---|" * len(HEIGHT_BUCKETS))
    for r in rows:
        print(f"| {r['drive']} | {r['rate']} | " + " | ".join(
            f"{_fmt(b['share'], 2)}, {_fmt(b['recall'], 2)}, {_fmt(b['near_miss'], 2)}, {_fmt(b['height_ratio'], 2)}x"
            for b in r["recall_by_height"]) + " |")
    print()
    print("| drive | boxes scored | half-rate IDF1 / full | half-rate MOTA / full | ID switches half / full |")
    print("|---|---|---|---|---|")
    for drive_name in drives:
        for key, label in (("scores", "all tracked"), ("scores_confirmed", "confirmed")):
            full, half = (next(r[key]["overall"] for r in rows if r["drive"] == drive_name and r["rate"] == rate)
                          for rate in ("full", "half"))
            print(f"| {drive_name} | {label} | {_ratio(half['idf1'], full['idf1'])} "
                  f"| {_ratio(half['mota'], full['mota'])} | {half['id_switches']} / {full['id_switches']} |")
    print()
    print("tracker cost (not reported by the server: a local Tracker on the same detections, timed per update)")
    print("| drive | rate | frames | detections / frame | p50 ms | p99 ms | tracks match the server's |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["tracker"]
        print(f"| {r['drive']} | {r['rate']} | {t['frames']} | {t['detections_per_frame']:.1f} "
              f"| {t['update_p50_ms']:.3f} | {t['update_p99_ms']:.3f} "
              f"| {'yes' if t['tracks_match_server'] else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
