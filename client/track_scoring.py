"""Multi-object tracking scores of a replay: the track ids the server gave each detection
(``DetectOptions.track``) scored against ground-truth tracks (a COCO file whose annotations
carry a ``track_id``, as generated drives' gt.json does), per camera and over all cameras.

The scores are motmetrics' (CLEAR MOT and the ID measures): MOTA, IDF1 / IDP / IDR, ID
switches, fragmentations, precision, recall, mean IoU of the matched pairs, mostly tracked /
lost. HOTA is not among them: motmetrics 1.4.0, its latest release, has none (its HOTA is
only on the project's main branch).

Rules, applied before motmetrics sees a box:

- A detection and a ground-truth box can match only if they are of the same class and their
  IoU is at least ``min_iou`` (0.5: motmetrics' IoU distance, 1 - IoU, at most 0.5). The class
  is found as the detection score finds it (client.ground_truth): by name in the ground truth's
  categories (case, spaces, hyphens and underscores aside); a frame without names, or frames
  none of whose names is a category's, map their class ids through the categories in id order
  (``perception.coco.category_ids``), as the build does.
- A camera is one sequence: the server keeps a tracker per camera, so ids are compared within
  a camera only. The same id in two cameras is two tracks (and the drive's one object seen by
  two cameras is two ground-truth tracks).
- Only frames given here are scored, by their ``sequence``: a replay that sent every other
  frame, or whose frames were dropped, is scored on the frames that were answered (as
  ``client.evaluation`` does), so a gap is what the tracker had to bridge, not a miss.
- Detections with track id 0 were not tracked (below the tracker's low score, or over its
  track limit): they are no tracker output, left out and counted (``untracked_detections``).
  So are detections of a class the ground truth does not know (``unknown_class_detections``).
- With ``confirmed_only``, detections whose track is still NEW (not matched on enough frames
  to be confirmed) are left out and counted too (``unconfirmed_detections``): ByteTrack's own
  output convention, where a track is reported from its confirmation on. By default they are
  scored: they carry an id, and a client that uses every id sees them.
- Ground-truth boxes marked ``iscrowd`` are no tracks and are left out.
- With ``min_gt_height`` (KITTI's "don't care" convention), ground-truth boxes shorter than that
  many source pixels are neither misses nor matches: they are left out, and so is a detection
  that overlaps one (same class, IoU >= ``min_iou``) or is itself that short, unless it could
  match a ground-truth box that is kept. Both are counted (``dont_care_gt_boxes``,
  ``dont_care_detections``). A drive whose far objects are a few pixels tall then scores the
  tracker on the objects a detector can see; the score over every box stays the default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from client.frames import FrameResult
from client.ground_truth import CategoryMap, GroundTruthIndex
from client.sinks.jsonl import is_client_status_record, read_jsonl
from perception.errors import DataError, InvalidInputError
from perception.tracking import TrackState
from perception.types import FrameStatus


@dataclass(frozen=True)
class TrackedFrame:
    """One answered frame's tracked detections.

    boxes: (N, 4) float32, x1 y1 x2 y2 in source-image pixels.
    class_ids: (N,) int64, the model's class indices.
    track_ids: (N,) int64, the server's track id of each detection (0 = not tracked).
    class_names: the name of each class id, or () to map class ids through the ground
        truth's categories in id order.
    track_states: the state of each detection's track (None where untracked), or () if not known.
    """

    camera_id: str
    sequence: int
    boxes: NDArray[np.float32]
    class_ids: NDArray[np.int64]
    track_ids: NDArray[np.int64]
    class_names: tuple[str, ...] = ()
    track_states: tuple[TrackState | None, ...] = ()
    file_name: str = ""  # the source's name of the frame (an image folder's file), if it has one

    def __post_init__(self) -> None:
        n = self.boxes.shape[0] if self.boxes.ndim == 2 else -1
        if self.boxes.shape != (n, 4) or self.class_ids.shape != (n,) or self.track_ids.shape != (n,):
            raise InvalidInputError(
                f"{self.camera_id}/{self.sequence}: inconsistent arrays: boxes {self.boxes.shape}, "
                f"class_ids {self.class_ids.shape}, track_ids {self.track_ids.shape}"
            )
        if self.class_names and len(self.class_names) != n:
            raise InvalidInputError(
                f"{self.camera_id}/{self.sequence}: {len(self.class_names)} class names for {n} boxes"
            )
        if self.track_states and len(self.track_states) != n:
            raise InvalidInputError(
                f"{self.camera_id}/{self.sequence}: {len(self.track_states)} track states for {n} boxes"
            )
        if n and int(self.track_ids.min()) < 0:
            raise InvalidInputError(f"{self.camera_id}/{self.sequence}: a track id is negative")
        if not np.isfinite(self.boxes).all():
            raise InvalidInputError(f"{self.camera_id}/{self.sequence}: a box is not finite")

    @classmethod
    def from_result(
        cls, result: FrameResult, track_ids: Sequence[int] | NDArray[np.integer],
        track_states: Sequence[TrackState | None] = (),
    ) -> TrackedFrame:
        """A replay answer and the track id (and state, if known) of each of its detections, in their order."""
        return cls(
            result.camera_id, result.sequence, result.detections.boxes, result.detections.class_ids,
            np.asarray(track_ids, np.int64).reshape(-1), result.class_names, tuple(track_states),
            str(result.extra.get("file_name", "")),
        )

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TrackedFrame:
        """A replay JSONL record of an answered frame; each detection may carry ``track_id``
        (absent = 0, not tracked) and ``track_state`` (a TrackState name; absent or empty =
        none). Raises DataError, KeyError, TypeError or ValueError on a malformed record."""
        result = FrameResult.from_json_dict(record)
        dets = record.get("detections") or []
        states = [TrackState(d["track_state"]) if d.get("track_state") else None for d in dets]
        has_states = any("track_state" in d for d in dets)
        return cls.from_result(result, [int(d.get("track_id", 0)) for d in dets], states if has_states else ())


def tracked_frames(results: Iterable[FrameResult]) -> list[TrackedFrame]:
    """The answered (OK) frames of a replay as TrackedFrames: each detection with its track
    from ``result.tracks`` (a result without tracks has every detection untracked)."""
    out: list[TrackedFrame] = []
    for r in results:
        if r.status is not FrameStatus.OK:
            continue
        if r.tracks is None:
            out.append(TrackedFrame.from_result(r, np.zeros((len(r.detections),), np.int64)))
        else:
            out.append(TrackedFrame.from_result(r, r.tracks.ids, r.tracks.states))
    return out


def has_ground_truth_tracks(gt: GroundTruthIndex) -> bool:
    """Whether any non-crowd annotation of the ground truth carries a ``track_id`` (a COCO file
    without, e.g. a labelled image set rather than a drive, cannot score tracking)."""
    return any("track_id" in a for a in gt.dataset.raw.get("annotations", []) if not a.get("iscrowd"))


def load_tracked_frames(path: str | os.PathLike[str]) -> list[TrackedFrame]:
    """The answered (OK) frames of a replay JSONL as TrackedFrames. DataError names file:line of
    a malformed record, or the file if no detection in it carries a ``track_id`` (a replay
    without tracking, which would score as all misses)."""
    out: list[TrackedFrame] = []
    detections = tracked = 0
    for i, rec in read_jsonl(path):
        if is_client_status_record(rec) or rec.get("status", "OK") != FrameStatus.OK.value:
            continue
        try:
            frame = TrackedFrame.from_record(rec)
        except (DataError, InvalidInputError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{path}:{i}: malformed replay record ({type(exc).__name__}: {exc})") from exc
        dets = rec.get("detections") or []
        detections += len(dets)
        tracked += sum(1 for d in dets if "track_id" in d)
        out.append(frame)
    if detections and not tracked:
        raise DataError(f"{path}: no detection carries a track_id: was the replay run with tracking?")
    return out


@dataclass(frozen=True)
class TrackScores:
    """Tracking scores of one camera, or of all cameras together (counts summed, rates
    recomputed from the sums). Rates are in [0, 1] except MOTA (at most 1, unbounded below);
    NaN where undefined (no ground-truth box: recall, MOTA, IDR; no tracked box: precision, IDP;
    no match: mean_iou)."""

    frames: int
    gt_boxes: int
    gt_tracks: int
    tracked_boxes: int
    true_positives: int  # matched boxes, ID switches included
    false_positives: int
    misses: int
    id_switches: int
    fragmentations: int
    mota: float
    idf1: float
    idp: float
    idr: float
    precision: float
    recall: float
    mean_iou: float  # of the matched pairs (1 - motmetrics' MOTP)
    mostly_tracked: int  # ground-truth tracks matched in at least 80 % of their boxes
    mostly_lost: int  # ... in less than 20 %

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready: NaN becomes None."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class TrackReport:
    """Scores per camera (sorted by camera id) and over all cameras, plus what was left out.

    frames_without_gt: frames given that the ground truth does not have.
    gt_frames_not_scored: ground-truth images no frame given was matched to, of every camera (as
        the detection score's ``gt_images_not_replayed``; ground truth without camera ids does
        not say which camera an image is of).
    untracked_detections / unconfirmed_detections / unknown_class_detections /
    dont_care_detections: detections left out (see the module docstring).
    dont_care_gt_boxes: ground-truth boxes under ``min_gt_height`` left out.
    """

    cameras: dict[str, TrackScores]
    overall: TrackScores
    frames_without_gt: int
    gt_frames_not_scored: int
    untracked_detections: int
    unconfirmed_detections: int
    unknown_class_detections: int
    min_gt_height: float = 0.0
    dont_care_gt_boxes: int = 0
    dont_care_detections: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "cameras": {cam: s.to_dict() for cam, s in self.cameras.items()},
            "overall": self.overall.to_dict(),
            "frames_without_gt": self.frames_without_gt,
            "gt_frames_not_scored": self.gt_frames_not_scored,
            "untracked_detections": self.untracked_detections,
            "unconfirmed_detections": self.unconfirmed_detections,
            "unknown_class_detections": self.unknown_class_detections,
            "min_gt_height": self.min_gt_height,
            "dont_care_gt_boxes": self.dont_care_gt_boxes,
            "dont_care_detections": self.dont_care_detections,
        }


# What motmetrics computes for a TrackScores (its names: motmetrics.metrics.create().list_metrics()).
_METRICS = (
    "num_frames", "num_objects", "num_unique_objects", "num_predictions", "num_detections", "num_false_positives",
    "num_misses", "num_switches", "num_fragmentations", "mota", "idf1", "idp", "idr", "precision", "recall", "motp",
    "mostly_tracked", "mostly_lost",
)


@dataclass(frozen=True)
class _GtFrame:
    boxes: NDArray[np.float64]  # (N, 4) x y w h
    categories: NDArray[np.int64]
    track_ids: NDArray[np.int64]


def _ground_truth_tracks(gt: GroundTruthIndex) -> dict[int, _GtFrame]:
    """image id -> its non-crowd boxes (x y w h), category ids and track ids. DataError names
    an annotation without a non-negative integer ``track_id``, or a track twice in one image."""
    rows: dict[int, list[tuple[list[float], int, int]]] = {iid: [] for iid in gt.dataset.images}
    source = gt.path or "ground truth"
    for i, a in enumerate(gt.dataset.raw.get("annotations", [])):
        if a.get("iscrowd"):
            continue
        tid = a.get("track_id")
        if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
            raise DataError(f"{source}: annotations[{i}] (id {a.get('id', '?')}) needs a non-negative integer "
                            f"'track_id', got {tid!r}")
        rows[a["image_id"]].append(([float(v) for v in a["bbox"]], int(a["category_id"]), tid))
    out: dict[int, _GtFrame] = {}
    for iid, r in rows.items():
        tids = np.array([x[2] for x in r], np.int64)
        if len(np.unique(tids)) != len(tids):
            raise DataError(f"{source}: image {iid} has a track_id on more than one box")
        out[iid] = _GtFrame(np.array([x[0] for x in r], np.float64).reshape(-1, 4),
                            np.array([x[1] for x in r], np.int64), tids)
    return out


def score_tracks(
    frames: Iterable[TrackedFrame], gt: GroundTruthIndex, min_iou: float = 0.5, confirmed_only: bool = False,
    min_gt_height: float = 0.0, model_classes: Sequence[str] = (),
) -> TrackReport:
    """Score the tracked frames against the ground truth's tracks (see the module docstring).
    ``model_classes``: the served model's class list, when known (``GroundTruthIndex.categories_for``).

    DataError if no frame is in the ground truth, a frame is given twice, two frames match one
    ground-truth image, a frame has a track id on two boxes, or ``confirmed_only`` meets a frame
    with tracked boxes and no track states; InvalidInputError for ``min_iou`` outside (0, 1] or
    a negative or non-finite ``min_gt_height``.
    """
    if not 0.0 < min_iou <= 1.0:
        raise InvalidInputError(f"min_iou must be in (0, 1], got {min_iou}")
    if not (math.isfinite(min_gt_height) and min_gt_height >= 0):
        raise InvalidInputError(f"min_gt_height must be a finite number >= 0, got {min_gt_height}")
    import motmetrics as mm  # type: ignore[import-untyped]  # ships no types (no py.typed, no stub package)

    gt_frames = _ground_truth_tracks(gt)
    frames = list(frames)
    image_ids = gt.match((f.camera_id, f.sequence, f.file_name) for f in frames)  # as the detection score does
    per_camera: dict[str, dict[int, tuple[TrackedFrame, int]]] = {}
    without_gt = 0
    for f in frames:
        iid = image_ids.get((f.camera_id, f.sequence))
        if iid is None:
            without_gt += 1
            continue
        per_camera.setdefault(f.camera_id, {})[f.sequence] = (f, iid)
    if not per_camera:
        raise DataError(f"{gt.path or 'ground truth'}: no tracked frame matches a ground-truth image "
                        "(by camera_id + sequence or file_name)")
    classes = gt.categories_for((n for cam in per_camera.values() for f, _ in cam.values() for n in f.class_names),
                                model_classes)
    untracked = unconfirmed = unknown = dont_care_gt = dont_care_dets = 0
    accumulators = {}
    for camera in sorted(per_camera):
        acc = mm.MOTAccumulator(auto_id=False)
        for seq, (f, iid) in sorted(per_camera[camera].items()):
            cats = np.array([_category(classes, f, i) for i in range(len(f.track_ids))], np.int64)
            known, tracked = cats >= 0, f.track_ids > 0
            unknown += int((~known).sum())
            untracked += int((known & ~tracked).sum())
            keep = known & tracked
            if confirmed_only and keep.any():
                if not f.track_states:
                    raise DataError(f"frame {camera}/{seq} has no track states to tell confirmed tracks by")
                new = np.array([st is TrackState.NEW for st in f.track_states], bool)
                unconfirmed += int((keep & new).sum())
                keep &= ~new
            hyp_ids = f.track_ids[keep]
            if len(np.unique(hyp_ids)) != len(hyp_ids):
                raise DataError(f"frame {camera}/{seq} has a track id on more than one box")
            hyp_boxes = f.boxes[keep].astype(np.float64)
            hyp_boxes[:, 2:] -= hyp_boxes[:, :2]  # x1 y1 x2 y2 -> x y w h, as motmetrics takes them
            hyp_cats = cats[keep]
            g = gt_frames[iid]
            if min_gt_height > 0:
                g, ignored = _dont_care(g, min_gt_height)
                dont_care_gt += len(ignored.boxes)
                cares = _cared_for(mm, g, ignored, hyp_boxes, hyp_cats, min_iou, min_gt_height)
                dont_care_dets += int((~cares).sum())
                hyp_ids, hyp_boxes, hyp_cats = hyp_ids[cares], hyp_boxes[cares], hyp_cats[cares]
            acc.update(g.track_ids.tolist(), hyp_ids.tolist(),
                       _distances(mm, g.boxes, g.categories, hyp_boxes, hyp_cats, min_iou), frameid=seq)
        accumulators[camera] = acc
    summary = mm.metrics.create().compute_many(
        list(accumulators.values()), names=list(accumulators), metrics=list(_METRICS),
        generate_overall=True,
    )
    rows = [_scores(summary.iloc[i]) for i in range(len(summary))]  # one per camera, in order, then the overall
    scored = {iid for cam in per_camera.values() for _, iid in cam.values()}
    return TrackReport(
        cameras=dict(zip(accumulators, rows[:-1], strict=True)),
        overall=rows[-1],
        frames_without_gt=without_gt,
        gt_frames_not_scored=len(gt.dataset.images) - len(scored),
        untracked_detections=untracked,
        unconfirmed_detections=unconfirmed,
        unknown_class_detections=unknown,
        min_gt_height=min_gt_height,
        dont_care_gt_boxes=dont_care_gt,
        dont_care_detections=dont_care_dets,
    )


def _dont_care(g: _GtFrame, min_height: float) -> tuple[_GtFrame, _GtFrame]:
    """(the boxes at least ``min_height`` tall, the shorter ones)."""
    tall = g.boxes[:, 3] >= min_height
    return (_GtFrame(g.boxes[tall], g.categories[tall], g.track_ids[tall]),
            _GtFrame(g.boxes[~tall], g.categories[~tall], g.track_ids[~tall]))


def _cared_for(
    mm: Any, kept: _GtFrame, ignored: _GtFrame, hyp_boxes: NDArray[np.float64], hyp_cats: NDArray[np.int64],
    min_iou: float, min_height: float,
) -> NDArray[np.bool_]:
    """Which detections are scored when ground truth under ``min_height`` is don't-care: all but
    those that overlap an ignored box of their class (IoU >= ``min_iou``) or are that short
    themselves, and could match no kept box."""
    could_match = ~np.isnan(_distances(mm, kept.boxes, kept.categories, hyp_boxes, hyp_cats, min_iou)).all(axis=0)
    on_ignored = ~np.isnan(_distances(mm, ignored.boxes, ignored.categories, hyp_boxes, hyp_cats, min_iou)).all(axis=0)
    short = hyp_boxes[:, 3] < min_height
    return np.asarray(could_match | ~(on_ignored | short), bool)


def _category(classes: CategoryMap, f: TrackedFrame, i: int) -> int:
    """The ground-truth category id of detection ``i``, or -1 if the ground truth has no such class."""
    cid = classes(f.class_names[i] if f.class_names else "", int(f.class_ids[i]))
    return -1 if cid is None else cid


def _distances(
    mm: Any, gt_boxes: NDArray[np.float64], gt_cats: NDArray[np.int64], hyp_boxes: NDArray[np.float64],
    hyp_cats: NDArray[np.int64], min_iou: float,
) -> NDArray[np.float64]:
    """(N, M) motmetrics IoU distances (1 - IoU), NaN (never a pair) for pairs of different
    classes or IoU below ``min_iou``. Built from ``motmetrics.distances.boxiou``, not its
    ``iou_matrix``, which calls ``np.asfarray`` (gone in NumPy 2)."""
    if not len(gt_boxes) or not len(hyp_boxes):
        return np.empty((len(gt_boxes), len(hyp_boxes)))
    dist = 1.0 - np.asarray(mm.distances.boxiou(gt_boxes[:, None], hyp_boxes[None, :]), np.float64)
    return np.where((dist > 1.0 - min_iou) | (gt_cats[:, None] != hyp_cats[None, :]), np.nan, dist)


def _scores(row: Any) -> TrackScores:
    """A TrackScores from one row of motmetrics' summary (a pandas Series)."""

    def count(name: str) -> int:
        v = float(row[name])
        return int(v) if math.isfinite(v) else 0

    def rate(name: str) -> float:
        v = float(row[name])  # 0/0 is NaN, x/0 infinite (e.g. MOTA without ground truth): both undefined
        return v if math.isfinite(v) else math.nan

    return TrackScores(
        frames=count("num_frames"), gt_boxes=count("num_objects"), gt_tracks=count("num_unique_objects"),
        tracked_boxes=count("num_predictions"), true_positives=count("num_detections"),
        false_positives=count("num_false_positives"), misses=count("num_misses"), id_switches=count("num_switches"),
        fragmentations=count("num_fragmentations"), mota=rate("mota"), idf1=rate("idf1"), idp=rate("idp"),
        idr=rate("idr"), precision=rate("precision"), recall=rate("recall"), mean_iou=1.0 - rate("motp"),
        mostly_tracked=count("mostly_tracked"), mostly_lost=count("mostly_lost"),
    )
