"""``perception replay SOURCE --server HOST:PORT --out FILE.jsonl``: replay a recorded drive
(video, image folder, MCAP, ROS 1 / ROS 2 bag) against one or more servers.

``--out`` gets one line per frame read: the server's answer, or a client status with a reason
(NOT_SENT, GIVEN_UP, REFUSED_DRAINING; client_status.py). A server that restarts or drains is
reconnected to, and the frames it did not answer are re-sent, for up to ``--reconnect-timeout``
seconds of failed reconnecting. Ctrl-C and SIGTERM stop the replay with every frame still
accounted for (exit code 130 / 143); a recording's frames after the stop are recorded NOT_SENT,
a live camera's are not read.

``--track`` asks the server for a track id per detection; ``--out`` records then carry
``track_id`` and ``track_state`` per detection, and with ``--gt`` (a drive's ground truth with
``track_id`` per annotation) the summary scores the tracks (client.track_scoring).

``--mcap-out`` writes the images and the detections drawn as Foxglove ImageAnnotations, per
camera on ``/<camera>/image`` and ``/<camera>/detections`` (client.sinks.mcap_annotations).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.client_status import Unanswered
from client.config import DEFAULT_GIVE_UP_AFTER_S, BackoffConfig, ClientConfig, TlsConfig
from client.convert import RequestOptions
from client.frames import FrameResult, FrameStatus
from client.pacing import Pacing
from perception.cli import add_progress_flag, show_progress
from perception.errors import ConfigError, DataError, PerceptionError

if TYPE_CHECKING:
    from client.ground_truth import GroundTruthIndex
    from client.replay import ReplayOutcome
    from client.sinks import Sink

log = logging.getLogger(__name__)


def add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server connection")
    g.add_argument("--server", action="append", required=True, metavar="HOST:PORT",
                   help="server address; repeat or comma-separate for client-side round-robin "
                        "(a name resolving to several addresses is expanded too)")
    g.add_argument("--token", default=None, help="bearer token (default: $PERCEPTION_TOKEN)")
    g.add_argument("--tls-ca", type=Path, help="CA bundle to verify the server (enables TLS)")
    g.add_argument("--tls-cert", type=Path, help="client certificate for mTLS")
    g.add_argument("--tls-key", type=Path, help="client private key for mTLS")
    g.add_argument("--tls-server-name", default="", help="name to check in the server certificate")
    g.add_argument("--tls", action="store_true", help="TLS with the system CA bundle")
    g.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for a server (default 10)")
    g.add_argument("--reconnect-timeout", type=float, default=DEFAULT_GIVE_UP_AFTER_S, metavar="SECONDS",
                   help="when the server goes away (restart, drain, network), keep reconnecting and re-sending "
                        "for this many seconds after the first failure before giving up on the frames in flight "
                        f"(0 = forever; default {DEFAULT_GIVE_UP_AFTER_S:.0f}, longer than a restart that reuses "
                        "its cached engine; a first start that builds a TensorRT engine can take minutes)")
    g.add_argument("--reconnect-attempts", type=int, default=0, metavar="N",
                   help="also give up after N consecutive failed reconnects, whichever bound comes first "
                        "(0 = no attempt bound, the default: --reconnect-timeout bounds reconnecting)")


def client_config(args: argparse.Namespace, window: int = 4, deadline_ms: int = 0) -> ClientConfig:
    targets = tuple(t.strip() for s in args.server for t in s.split(",") if t.strip())
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        tls = TlsConfig(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
    token = args.token if args.token is not None else os.environ.get("PERCEPTION_TOKEN", "")
    if args.reconnect_timeout < 0 or args.reconnect_attempts < 0:
        raise ConfigError("--reconnect-timeout and --reconnect-attempts must not be negative (0 = no bound)")
    backoff = BackoffConfig(max_attempts=args.reconnect_attempts, give_up_after_s=args.reconnect_timeout)
    return ClientConfig(
        targets=targets, tls=tls, token=token, window=window, deadline_ms=deadline_ms,
        connect_timeout_s=args.connect_timeout, backoff=backoff,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perception replay",
        description=(
            "Replay a recording (MP4/AVI, image folder, MCAP, ROS 1 .bag, ROS 2 bag) against a detector server."
        ),
    )
    p.add_argument("source", help="recording: video file, image folder, .mcap, .bag or ROS 2 bag directory; "
                   "or a live camera (rtsp:// or http(s):// URL, /dev/videoN), read until its stream ends")
    add_connection_args(p)
    o = p.add_argument_group("outputs")
    o.add_argument("--out", type=Path,
                   help="JSONL, one object per frame read: the server's answer, or a client status "
                        "(NOT_SENT, GIVEN_UP, REFUSED_DRAINING) with a reason; written a whole line at a time")
    o.add_argument("--json-out", type=Path, metavar="FILE", help="write the summary (and KPI with --gt) as JSON")
    # The flag's name before file outputs were --out / --json-out everywhere; kept for old scripts.
    o.add_argument("--summary-json", type=Path, dest="json_out", help=argparse.SUPPRESS)
    o.add_argument("--json", action="store_true", help="print the summary as JSON on stdout instead of a table")
    o.add_argument("--coco-results", type=Path, help="write detections as COCO results JSON")
    o.add_argument("--video-out", type=Path, help="annotated video (boxes, labels, latency overlay) of one camera")
    o.add_argument("--video-camera", default="", help="camera for --video-out (default: the first one)")
    o.add_argument("--mcap-out", type=Path, metavar="FILE.mcap",
                   help="MCAP for Foxglove: per camera, the images on /<camera>/image (foxglove.CompressedImage) "
                        "and the detections on /<camera>/detections (foxglove.ImageAnnotations: a box outline and "
                        "a 'class score' label per detection, '#track_id class score' with --track), at the "
                        "frames' capture times; frames answered with a status other than OK get the image only. "
                        "Written to a temporary file and renamed when the replay ends")
    add_progress_flag(o)
    e = p.add_argument_group("evaluation")
    e.add_argument("--gt", type=Path, help="COCO ground truth: turn the replay into an evaluation")
    e.add_argument("--kpi-score-threshold", type=float, default=0.25,
                   help="score threshold for precision / recall (default 0.25)")
    e.add_argument("--track-confirmed-only", action="store_true",
                   help="with --track --gt: score only detections whose track is confirmed, leaving out those "
                        "of NEW tracks (ByteTrack's output convention; default: every tracked detection)")
    e.add_argument("--track-min-gt-height", type=float, default=0.0, metavar="PX",
                   help="with --track --gt: ground-truth boxes shorter than PX source pixels are 'don't care' "
                        "(KITTI's convention): not misses, and a detection on one is no false positive "
                        "(default 0: every box scored)")
    t = p.add_argument_group("pacing")
    speed = t.add_mutually_exclusive_group()
    speed.add_argument("--speed", type=float, default=1.0, help="playback speed factor (1 = recorded time)")
    speed.add_argument("--max-rate", action="store_true", help="as fast as the server answers")
    t.add_argument("--loop", action="store_true", help="start over at the end (until --max-frames or Ctrl-C)")
    t.add_argument("--skip", type=int, default=0, metavar="N", help="after each frame sent, skip N of that camera")
    t.add_argument("--max-frames", type=int, default=0, help="stop after this many frames (0 = all)")
    t.add_argument("--window", type=int, default=2,
                   help="frames in flight per camera stream (default 2: a server keeps the newest 2 frames per "
                        "camera and answers older ones DROPPED_STALE, so a larger window only adds drops)")
    t.add_argument("--deadline-ms", type=int, default=0, help="per-frame deadline sent to the server (0 = none)")
    s = p.add_argument_group("source")
    s.add_argument("--topic", action="append", default=[], help="MCAP / bag image topic (repeat; default: all)")
    s.add_argument("--camera", default="", help="camera id of a video or flat image folder (default: its name)")
    s.add_argument("--fps", type=float, default=10.0, help="frame rate of an image folder without timestamps")
    s.add_argument("--timestamps", type=Path, help="image folder timestamps file")
    s.add_argument("--encode", choices=("raw", "jpeg"), default="raw",
                   help="send decoded video frames raw (default) or re-encoded as JPEG")
    r = p.add_argument_group("detection options (default: the model's)")
    r.add_argument("--score-threshold", type=float, default=0.0, help="keep detections scoring at least this")
    r.add_argument("--iou-threshold", type=float, default=0.0, help="NMS IoU threshold")
    r.add_argument("--max-detections", type=int, default=0, help="most detections per frame")
    r.add_argument("--classes", default="", help="comma-separated class ids to keep")
    r.add_argument("--class-agnostic-nms", action="store_true", help="one NMS across classes (default: per class)")
    r.add_argument("--track", action="store_true",
                   help="ask the server for tracks: every --out detection then carries track_id (0 = not tracked) "
                        "and track_state (NEW or CONFIRMED, or null when not tracked); without --track "
                        "the records have neither field, as before. --video-out colours boxes by track id. With "
                        "--gt carrying track_id per annotation (a generated drive's gt.json), the summary adds "
                        "MOTA, IDF1, ID switches, fragmentations, precision and recall ('tracking')")
    return p


def _progress(total: int | None, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", file=sys.stderr, disable=disable, dynamic_ncols=True, leave=False)


def _total_frames(source: Any, pacing: Pacing) -> int | None:
    if pacing.loop and not pacing.max_frames:
        return None
    counts: list[int] = []
    if hasattr(source, "frame_count"):
        counts = [int(source.frame_count)]
    elif hasattr(source, "topics"):
        counts = [int(n) for _, n in source.topics.values()]
    elif hasattr(source, "cameras"):
        counts = [len(v) for v in source.cameras.values()]
    if not counts or min(counts) < 0:
        return pacing.max_frames or None
    total = sum(-(-c // (pacing.skip + 1)) for c in counts)
    return min(total, pacing.max_frames) if pacing.max_frames else total


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from client.detector_client import DetectorClient
    from client.evaluation import classes_of_answers, evaluate_replay
    from client.ground_truth import GroundTruthIndex, coco_predictions
    from client.replay import Replay, ReplayConfig
    from client.sinks.atomic_json import write_json_atomic
    from client.sources import SourceOptions, open_source
    from client.sources.live_source import without_credentials
    from client.summary import format_table
    from client.track_scoring import has_ground_truth_tracks

    if args.loop and args.gt:
        raise ConfigError("--gt cannot be combined with --loop (each frame would be scored once per lap)")
    if args.track_confirmed_only and not (args.track and args.gt):
        raise ConfigError("--track-confirmed-only chooses what tracking scores count: it needs --track and --gt")
    if args.track_min_gt_height and not (args.track and args.gt):
        raise ConfigError("--track-min-gt-height chooses what tracking scores count: it needs --track and --gt")
    if not (math.isfinite(args.track_min_gt_height) and args.track_min_gt_height >= 0):
        raise ConfigError(f"--track-min-gt-height must be a number of pixels >= 0, got {args.track_min_gt_height}")
    if not (args.out or args.json_out or args.coco_results or args.video_out or args.mcap_out):
        log.info("no --out given: only the summary is printed")
    try:
        classes = tuple(int(c) for c in args.classes.split(",") if c.strip())
    except ValueError as exc:
        raise ConfigError(f"--classes must be comma-separated class ids, got {args.classes!r}") from exc
    options = RequestOptions(
        args.score_threshold, args.iou_threshold, args.max_detections, classes, args.class_agnostic_nms, args.track
    )
    pacing = Pacing(
        speed=None if args.max_rate else args.speed, skip=args.skip, loop=args.loop, max_frames=args.max_frames,
        fps=args.fps,
    )
    config = client_config(args, window=args.window, deadline_ms=args.deadline_ms)
    gt = GroundTruthIndex.load(args.gt) if args.gt else None
    tracking_skipped = ""
    if args.track and gt is not None and not has_ground_truth_tracks(gt):
        tracking_skipped = f"{args.gt} has no track_id in its annotations: tracking is not scored"
        print(f"perception replay: {tracking_skipped}", file=sys.stderr)
    source = open_source(
        args.source,
        SourceOptions(
            topics=tuple(args.topic), camera=args.camera, fps=args.fps, encode=args.encode, timestamps=args.timestamps
        ),
    )
    log.info("source: %s", source.describe())

    sinks: list[Sink] = []
    started = False  # the replay ran: its sinks publish what it wrote, else they are discarded
    client = DetectorClient(config)
    sigterm = _SigtermAsInterrupt()
    model_classes: tuple[str, ...] = ()  # the served model's classes: how scoring maps them to categories
    model_version = ""  # ... and which model they are of
    try:
        client.wait_ready()
        info = client.model_info()
        model_classes, model_version = info.classes, info.version
        log.info("server: model %s %s (%s, %s) at %s", info.name, info.version, info.variant or info.precision,
                 info.backend, ", ".join(e.address for e in client.pool.endpoints))
        # In this order, so that an output that cannot be opened leaves the others' files as they
        # were: the video file is created at its first frame, the MCAP goes to a temporary file
        # (removed unless the replay runs), and --out, emptied when opened, comes last.
        if args.video_out:
            from client.sinks.annotated_video import AnnotatedVideoSink

            fps = float(getattr(source, "fps", 0.0) or args.fps)
            sinks.append(AnnotatedVideoSink(args.video_out, fps=fps * (1 if args.skip == 0 else 1 / (args.skip + 1)),
                                            camera_id=args.video_camera))
        if args.mcap_out:
            from client.sinks.mcap_annotations import McapAnnotationsSink

            sinks.append(McapAnnotationsSink(args.mcap_out))
        if args.out:
            from client.sinks.jsonl import JsonlSink

            sinks.append(JsonlSink(args.out))
        bar = _progress(_total_frames(source, pacing), not show_progress(args.no_progress))

        def on_progress(record: FrameResult | Unanswered) -> None:
            bar.update(1)

        keep = bool(args.gt or args.coco_results)  # a long --loop replay must not grow without bound
        replay_config = ReplayConfig(pacing=pacing, options=options, keep_results=keep)
        replay = Replay(client, source, replay_config, sinks, on_progress)
        try:
            sigterm.install()
            started = True
            outcome = replay.run()
        finally:
            sigterm.raising = False  # from here on SIGTERM is only noted: the sinks must finish
            bar.close()
    finally:
        try:
            if started:
                close_error = _close_sinks(sinks)
            else:
                _discard_sinks(sinks)
            client.close()
        finally:
            sigterm.restore()
    terminated = sigterm.came

    summary = outcome.stats.as_dict()
    summary["source"] = without_credentials(str(args.source))
    if gt is not None or args.coco_results:  # (what is scored: a swap mid-replay is told only then)
        model_classes = classes_of_answers(outcome.results, model_classes, model_version,
                                           "read when the replay began")
    kpi_error: PerceptionError | None = None
    answered_ok = any(r.status is FrameStatus.OK for r in outcome.results)
    if gt is not None and not answered_ok and not outcome.interrupted:
        # Scored against --gt, a replay with nothing to score is a failure, not a zero.
        kpi_error = DataError(f"no frame was answered OK ({_statuses(outcome)}): nothing to score against the "
                              "ground truth")
        summary["kpi_error"] = str(kpi_error)
    elif gt is not None and answered_ok:
        try:
            summary["kpi"] = evaluate_replay(outcome.results, gt, args.kpi_score_threshold, outcome.file_names,
                                             model_classes)
        except PerceptionError as exc:  # still write what the replay produced
            kpi_error = exc
            summary["kpi_error"] = str(exc)
    tracking_error: PerceptionError | None = None
    if not tracking_skipped and args.track and gt is not None and kpi_error is not None:
        tracking_skipped = "the KPI refused the frames (kpi_error): their tracks are not scored either"
    if tracking_skipped:
        summary["tracking_skipped"] = tracking_skipped
    elif args.track and gt is not None and answered_ok and kpi_error is None:  # (frames the KPI refused: no score)
        try:
            summary["tracking"] = _score_tracking(outcome.results, gt, args.track_confirmed_only,
                                                  args.track_min_gt_height, model_classes)
        except PerceptionError as exc:  # as for the KPI: the rest of the summary is still written
            tracking_error = exc
            summary["tracking_error"] = str(exc)
    if args.coco_results:
        try:
            preds = coco_predictions(outcome.results, gt, outcome.file_names, model_classes)
        except PerceptionError as exc:  # frames the ground truth cannot tell apart: the KPI met it first
            kpi_error = kpi_error or exc
        else:
            write_json_atomic(args.coco_results, preds.records, indent=None)
    if args.json_out:
        write_json_atomic(args.json_out, summary)
    print(json.dumps(summary, indent=1) if args.json else format_table(summary))
    sys.stdout.flush()
    if outcome.interrupted:
        print(f"perception replay: {'terminated (SIGTERM)' if terminated else 'interrupted'}; outputs hold the "
              "frames answered so far, the others as NOT_SENT / GIVEN_UP", file=sys.stderr)
        if close_error is not None:
            print(f"perception replay: error: {close_error}", file=sys.stderr)
        return 143 if terminated else 130
    if outcome.error is not None:
        raise outcome.error
    if close_error is not None:
        raise close_error
    if kpi_error is not None:
        raise kpi_error
    if tracking_error is not None:
        raise tracking_error
    return 0


class _SigtermAsInterrupt:
    """SIGTERM (docker stop, systemd, timeout) ends the replay as Ctrl-C does: every frame gets
    its record and --mcap-out is finished, where the default action killed the process at once.

    ``install()`` (just before the replay runs) sets the handler: while ``raising``, the first
    SIGTERM raises KeyboardInterrupt in the main thread. The caller clears ``raising`` once the
    replay has returned, and the handler stays until ``restore()``, after the sinks are closed:
    a SIGTERM while they finish (an MCAP file's summary and rename) is only noted, where the
    default action would leave the file unfinished. A second SIGTERM while the replay drains its
    answers is noted too: the replay is already stopping. ``came``: SIGTERM arrived. Only the
    main thread can install a handler: elsewhere (main() called from a thread) SIGTERM keeps its
    action."""

    def __init__(self) -> None:
        self.came = False
        self.raising = True
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(signal.SIGTERM, self._on_term)
        self._installed = True

    def restore(self) -> None:
        if self._installed:
            # None: the handler before was not installed from Python; the default is the closest.
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _on_term(self, signum: int, _frame: Any) -> None:
        first = not self.came
        self.came = True
        if first and self.raising:
            raise KeyboardInterrupt


def _close_sinks(sinks: list[Sink]) -> PerceptionError | None:
    """Close every sink, even when one fails (--mcap-out finishes and renames its file in
    close()); the first failure, raised by the caller once the summary is out."""
    first: PerceptionError | None = None
    for sink in sinks:
        try:
            sink.close()
        except PerceptionError as exc:
            first = first or exc
    return first


def _discard_sinks(sinks: list[Sink]) -> None:
    """The replay never ran (an output could not be opened, Ctrl-C during set-up): publish
    nothing, so that no earlier run's file is replaced by an empty one. The error on its way
    out is the one to report; a temporary file that cannot be removed only adds a log line."""
    for sink in sinks:
        try:
            sink.discard()
        except OSError as exc:
            log.warning("cannot remove an unused output: %s", exc)


def _statuses(outcome: ReplayOutcome) -> str:
    """How the replay's frames ended, e.g. "12 OVERLOADED, 3 NOT_SENT"; "no frame" if none."""
    counts: dict[str, int] = {}
    for r in outcome.results:
        counts[r.status.value] = counts.get(r.status.value, 0) + 1
    for u in outcome.unanswered:
        counts[u.status.value] = counts.get(u.status.value, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "no frame"


def _score_tracking(results: list[FrameResult], gt: GroundTruthIndex, confirmed_only: bool,
                    min_gt_height: float = 0.0, model_classes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The summary's ``tracking`` block: client.track_scoring's report of the answered frames."""
    from client.track_scoring import score_tracks, tracked_frames

    report = score_tracks(tracked_frames(results), gt, confirmed_only=confirmed_only, min_gt_height=min_gt_height,
                          model_classes=model_classes)
    return {"confirmed_only": confirmed_only, **report.to_dict()}
