"""Cost of one ``perception.tracking.Tracker.update`` per frame, at 10, 50 and 100 detections.

Seeded synthetic scenes at 30 fps on a 1920x1080 image: objects of three classes, 20-240 px
wide, moving at constant velocities of up to 300 px/s, each replaced by a new object when it
leaves the image, their boxes jittered by 2 px;
5% of the detections are missed each frame, 20% score below the high threshold, and the
detections come in a shuffled order. The scenes are stepped round robin, one frame of each in
turn, so load from other jobs hits every size alike. Per size: p50 / p99 / max of the update's
wall-clock time, p50 / p99 of its CPU time (the thread's own: on a busy machine the wall-clock
tail is mostly waiting for a core), the wall-clock p99's ratio to the 1 ms budget per frame,
and how well identities held
(distinct confirmed track ids per object over its life; 1.00 is perfect).

With ``--against REV`` the tracker of git revision REV (``perception/tracking`` and
``perception/boxes.py`` as they were there) runs beside today's, on the same detections, the
two alternating within every frame: on a machine whose speed drifts by half from one run to
the next, only this comparison is fair. Printed: each one's p50 / p99 and the ratios, and the
frames where their tracks differ (ids, states, restarts; 0 for a change meant to be a pure
speed-up).

Not a test: nothing is asserted. Timings swing with other jobs on a shared machine.

    .venv/bin/python -m bench.bench_tracking [--sizes 10 50 100] [--frames 900] [--seed 0] [--against REV] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from perception.tracking import Tracker, TrackerConfig, TrackState
from perception.types import Detections

FRAME_NS = 33_333_333  # 30 fps
IMAGE_WH = (1920.0, 1080.0)
WARMUP_FRAMES = 30
BUDGET_MS = 1.0


class Scene:
    """``n`` objects in view, each at constant velocity; one that leaves the image is replaced
    by a new object (a new key) somewhere in it, so objects come and go as on a road."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.rng = rng
        self.keys = np.arange(n, dtype=np.int64)
        self.next_key = n
        self.centre = np.zeros((n, 2))
        self.velocity = np.zeros((n, 2))
        self.size = np.zeros((n, 2))
        self.classes = np.zeros((n,), np.int64)
        self._spawn(np.arange(n))

    def _spawn(self, rows: NDArray[np.int64]) -> None:
        k = rows.size
        w = self.rng.uniform(20, 240, k)
        self.size[rows] = np.column_stack([w, w * self.rng.uniform(0.5, 2.5, k)])
        self.centre[rows] = self.rng.uniform(self.size[rows] / 2, np.array(IMAGE_WH) - self.size[rows] / 2)
        self.velocity[rows] = self.rng.uniform(-300, 300, (k, 2))
        self.classes[rows] = self.rng.integers(0, 3, k)

    def step(self, dt: float) -> tuple[Detections, NDArray[np.int64]]:
        """Advance ``dt`` seconds; the frame's detections and the object (key) of each one."""
        self.centre += self.velocity * dt
        gone = np.flatnonzero(((self.centre < 0) | (self.centre > np.array(IMAGE_WH))).any(axis=1))
        if gone.size:
            self.keys[gone] = np.arange(self.next_key, self.next_key + gone.size)
            self.next_key += gone.size
            self._spawn(gone)
        n = self.keys.size
        seen = np.flatnonzero(self.rng.uniform(0, 1, n) >= 0.05)
        seen = seen[self.rng.permutation(seen.size)]
        c, half = self.centre[seen], self.size[seen] / 2
        boxes = np.concatenate([c - half, c + half], axis=1) + self.rng.normal(0, 2.0, (seen.size, 4))
        scores = np.where(self.rng.uniform(0, 1, seen.size) < 0.2, self.rng.uniform(0.15, 0.5, seen.size),
                          self.rng.uniform(0.5, 0.99, seen.size))
        det = Detections(boxes.astype(np.float32), scores.astype(np.float32), self.classes[seen].astype(np.int64))
        return det, self.keys[seen]


REPO = Path(__file__).resolve().parents[1]
_REF_PACKAGE = "_ref_tracking"


@contextlib.contextmanager
def reference_tracking(rev: str) -> Iterator[Any]:
    """The ``perception.tracking`` package of git revision ``rev``, with the ``perception.boxes``
    of that revision, imported as ``_ref_tracking`` from a temporary copy; on leaving, the copy,
    its ``sys.path`` entry and its modules are gone (a second revision loads afresh)."""
    with tempfile.TemporaryDirectory() as tmp:
        _forget_reference()
        sys.path.insert(0, tmp)
        try:
            yield _load_reference(rev, Path(tmp))
        finally:
            sys.path.remove(tmp)
            _forget_reference()


def _forget_reference() -> None:
    for name in [m for m in sys.modules if m == _REF_PACKAGE or m.startswith(f"{_REF_PACKAGE}.")]:
        del sys.modules[name]


def _load_reference(rev: str, into: Path) -> Any:
    def show(path: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True,
                              capture_output=True, text=True).stdout

    names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", rev, "perception/tracking/"],
                           check=True, capture_output=True, text=True).stdout.split()
    package = into / _REF_PACKAGE
    package.mkdir()
    files = [(n, Path(n).name) for n in names if n.endswith(".py")] + [("perception/boxes.py", "_boxes.py")]
    for path, target in files:
        text = show(path).replace("perception.tracking", _REF_PACKAGE)
        text = text.replace("perception.boxes", f"{_REF_PACKAGE}._boxes")
        (package / target).write_text(text)
    importlib.invalidate_caches()
    return importlib.import_module(_REF_PACKAGE)


def compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Today's tracker and the one at ``args.against`` on the same frames, alternating first;
    a frame differs when its track ids, states or restart flag do (warm-up frames included)."""
    with reference_tracking(args.against) as ref:
        rows = []
        for n in args.sizes:
            scene = Scene(n, np.random.default_rng([args.seed, n]))
            ours, theirs = Tracker(TrackerConfig()), ref.Tracker(ref.TrackerConfig())
            times: dict[str, list[int]] = {"ours": [], "ref": []}
            differ = 0
            t_ns = 1_700_000_000_000_000_000
            for frame in range(WARMUP_FRAMES + args.frames):
                t_ns += FRAME_NS
                det, _ = scene.step(FRAME_NS / 1e9)
                order = (("ours", ours), ("ref", theirs)) if frame % 2 else (("ref", theirs), ("ours", ours))
                out = {}
                for name, tracker in order:
                    start = time.perf_counter_ns()
                    out[name] = tracker.update(det, t_ns)
                    if frame >= WARMUP_FRAMES:
                        times[name].append(time.perf_counter_ns() - start)
                a, b = out["ours"], out["ref"]
                differ += not (np.array_equal(a.track_ids, b.track_ids) and a.restarted == b.restarted
                               and [str(s) for s in a.states] == [str(s) for s in b.states])
            row: dict[str, Any] = {"detections": n, "frames": args.frames, "frames_with_other_tracks": differ}
            for name, ts in times.items():
                ms = np.asarray(ts, np.float64) / 1e6
                row[f"{name}_p50_ms"] = float(np.percentile(ms, 50))
                row[f"{name}_p99_ms"] = float(np.percentile(ms, 99))
            rows.append(row)
    print(f"\ntracker update per frame, today's vs {args.against}'s, alternating within each frame")
    print("| detections | p50 ms | ref p50 ms | p50 ratio | p99 ms | ref p99 ms | p99 ratio "
          "| frames with other tracks |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['detections']} | {r['ours_p50_ms']:.3f} | {r['ref_p50_ms']:.3f} "
              f"| {r['ours_p50_ms'] / r['ref_p50_ms']:.2f}x | {r['ours_p99_ms']:.3f} | {r['ref_p99_ms']:.3f} "
              f"| {r['ours_p99_ms'] / r['ref_p99_ms']:.2f}x | {r['frames_with_other_tracks']} |")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_tracking", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100], help="detections per frame")
    p.add_argument("--frames", type=int, default=900, help="frames per scene (30 fps; after a 30-frame warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--against", metavar="REV", help="also run the tracker of this git revision beside today's")
    p.add_argument("--buffer-per-s", type=float, default=TrackerConfig.buffer_per_s,
                   help="TrackerConfig.buffer_per_s of today's tracker (0: plain IoU only; docs/tracking.md)")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.frames < 1 or any(n < 1 for n in args.sizes):
        print("bench_tracking: --frames and --sizes must be >= 1", file=sys.stderr)
        return 2
    config = TrackerConfig(buffer_per_s=args.buffer_per_s)
    scenes = [Scene(n, np.random.default_rng([args.seed, n])) for n in args.sizes]
    trackers = [Tracker(config) for _ in args.sizes]
    times: list[list[int]] = [[] for _ in args.sizes]
    cpu_times: list[list[int]] = [[] for _ in args.sizes]
    ids_of: list[dict[int, set[int]]] = [{} for _ in args.sizes]
    t_ns = 1_700_000_000_000_000_000
    for frame in range(WARMUP_FRAMES + args.frames):
        t_ns += FRAME_NS
        for i, (scene, tracker) in enumerate(zip(scenes, trackers, strict=True)):
            det, objects = scene.step(FRAME_NS / 1e9)
            start, cpu_start = time.perf_counter_ns(), time.thread_time_ns()
            result = tracker.update(det, t_ns)
            elapsed, cpu = time.perf_counter_ns() - start, time.thread_time_ns() - cpu_start
            if frame >= WARMUP_FRAMES:
                times[i].append(elapsed)
                cpu_times[i].append(cpu)
                for obj, tid, state in zip(objects.tolist(), result.track_ids.tolist(), result.states, strict=True):
                    if state is TrackState.CONFIRMED:
                        ids_of[i].setdefault(obj, set()).add(tid)

    rows = []
    for n, ts, cts, ids in zip(args.sizes, times, cpu_times, ids_of, strict=True):
        ms = np.asarray(ts, np.float64) / 1e6
        cpu_ms = np.asarray(cts, np.float64) / 1e6
        p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
        rows.append({
            "detections": n, "frames": len(ts), "p50_ms": p50, "p99_ms": p99, "max_ms": float(ms.max()),
            "cpu_p50_ms": float(np.percentile(cpu_ms, 50)), "cpu_p99_ms": float(np.percentile(cpu_ms, 99)),
            "p99_of_budget": p99 / BUDGET_MS,
            "ids_per_object": float(np.mean([len(s) for s in ids.values()])) if ids else 0.0,
        })
    print(f"tracker update per frame, {args.frames} frames per size, buffer_per_s {config.buffer_per_s:g} "
          f"(numpy {np.__version__})")
    print("| detections | p50 ms | p99 ms | max ms | CPU p50 ms | CPU p99 ms | p99 / 1 ms budget "
          "| confirmed ids per object |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['detections']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['max_ms']:.3f} "
              f"| {r['cpu_p50_ms']:.3f} | {r['cpu_p99_ms']:.3f} | {r['p99_of_budget']:.2f}x "
              f"| {r['ids_per_object']:.2f} |")
    against = compare(args) if args.against else None
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "against": against}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
