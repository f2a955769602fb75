"""``perception camera SOURCE... --server HOST:PORT``: the camera-node program.

Streams live cameras (V4L2 ``/dev/videoN``, ``rtsp://`` / ``http(s)://`` streams, GStreamer
pipelines where this OpenCV has GStreamer; or a recording with ``--loop``, as a fake live
camera) to a detector server, newest frame first (camera_node.py). Runs until SIGTERM / SIGINT
(or ``--duration``), then prints one line per camera: frames captured, sent, answered OK,
dropped, too large to send (when any), lost, reconnects, p50 / p99 latency. An answer that
cannot be written to ``--out`` stops the node, which then exits with that error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from client.camera_stats import CameraSummary, format_table
from client.convert import RequestOptions
from client.frames import FrameResult, SourceFrame
from client.live_capture import Camera, LiveCamera, RecordingCamera
from client.replay_cli import add_connection_args, client_config
from client.sources.base import SourceOptions
from client.sources.live_source import CaptureRequest, LiveKind, live_target, opencv_has_gstreamer
from perception.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perception camera",
        description="Stream live cameras to a detector server, newest frame first; runs until SIGTERM / Ctrl-C.",
    )
    p.add_argument("source", nargs="+",
                   help="camera: /dev/videoN, rtsp://..., http(s)://... (MJPEG / H.264), a GStreamer pipeline "
                        "(needs an OpenCV with GStreamer), or with --loop a recording (video, image folder, "
                        ".mcap, bag)")
    p.add_argument("--camera-id", action="append", default=[], metavar="ID",
                   help="camera id of each source, in order (repeat; default: derived from the source)")
    add_connection_args(p)
    c = p.add_argument_group("capture (V4L2 devices: what to ask the driver for; default: its own)")
    c.add_argument("--width", type=int, default=0, help="frame width to request (0: the driver's)")
    c.add_argument("--height", type=int, default=0, help="frame height to request (0: the driver's)")
    c.add_argument("--fps", type=float, default=0.0, help="frame rate to request (0: the driver's)")
    c.add_argument("--fourcc", default="", help="pixel format, e.g. MJPG or YUYV")
    c.add_argument("--loop", action="store_true", help="play recordings in real time, over and over, as live cameras")
    c.add_argument("--topic", action="append", default=[], help="MCAP / bag image topic of a looped recording")
    c.add_argument("--retry-max", type=float, default=10.0, metavar="SECONDS",
                   help="longest wait between attempts to reopen a lost camera (default 10; retried until stopped)")
    s = p.add_argument_group("sending")
    s.add_argument("--encode", choices=("jpeg", "raw", "shm"), default="jpeg",
                   help="JPEG (default); raw BGR8 pixels (no encode cost, for a server on the same host; above 1080p "
                        "the server's default 8 MiB message limit needs raising); or shm: "
                        "BGR8 pixels in a shared-memory ring on this host, only a slot reference on the wire "
                        "(the server needs --shm-allow covering --shm-prefix)")
    s.add_argument("--shm-prefix", default="perception-",
                   help="name prefix of the shared-memory rings with --encode shm (default perception-)")
    s.add_argument("--shm-mode", type=lambda v: int(v, 8), default=0o600,
                   help="octal mode of the rings (default 600: this user only); 640 with --shm-group lets a "
                        "server running as another user in that group read them")
    s.add_argument("--shm-group", default=None, help="group (name or id) the rings belong to, with --shm-mode 640")
    s.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 with --encode jpeg (default 90)")
    s.add_argument("--window", type=int, default=2,
                   help="frames in flight per camera (default 2); newer frames replace the one waiting")
    s.add_argument("--deadline-ms", type=int, default=0, help="per-frame deadline sent to the server (0 = none)")
    s.add_argument("--score-threshold", type=float, default=0.0,
                   help="keep detections scoring at least this (0: the model's default)")
    s.add_argument("--track", action="store_true",
                   help="ask the server for a track id per detection (per camera; --out then carries track_id and "
                        "track_state)")
    o = p.add_argument_group("output")
    o.add_argument("--stats-every", type=float, default=0.0, metavar="SECONDS",
                   help="print the per-camera table on stderr every SECONDS (0 = only at the end)")
    o.add_argument("--out", type=Path, help="JSONL of every answer (grows without bound on a long run)")
    o.add_argument("--json", action="store_true", help="print the final summary as JSON instead of lines")
    o.add_argument("--duration", type=float, default=0.0, metavar="SECONDS",
                   help="stop after SECONDS (default 0: run until SIGTERM / Ctrl-C)")
    return p


def open_cameras(args: argparse.Namespace) -> list[tuple[str, Camera]]:
    """(camera id, camera) per source; ConfigError for what retrying cannot fix."""
    if len(args.camera_id) > len(args.source):
        raise ConfigError(f"{len(args.camera_id)} --camera-id for {len(args.source)} sources")
    request = CaptureRequest(args.width, args.height, args.fps, args.fourcc)
    out: list[tuple[str, Camera]] = []
    for i, src in enumerate(args.source):
        given = args.camera_id[i] if i < len(args.camera_id) else ""
        target = live_target(src)
        camera: Camera
        if target is None:
            path = Path(src)
            if not path.exists():
                raise ConfigError(f"{src}: no such file, device or URL (live sources: /dev/videoN, rtsp://, http://)")
            if not args.loop:
                raise ConfigError(f"{src} is a recording: add --loop to play it as a live camera, "
                                  "or use `perception replay`")
            encode = "raw" if args.encode == "shm" else args.encode  # shm: the node copies raw frames into its ring
            options = SourceOptions(topics=tuple(args.topic), encode=encode, jpeg_quality=args.jpeg_quality)
            camera = RecordingCamera(path, options)
            default_id = path.stem if path.is_file() else path.name
        else:
            if target.kind is LiveKind.GSTREAMER and not opencv_has_gstreamer():
                raise ConfigError(
                    "GStreamer pipelines need an OpenCV built with GStreamer; this one is not "
                    "(opencv-python-headless from PyPI): use an rtsp:// or http:// URL, which FFmpeg opens"
                )
            camera = LiveCamera(target, request)
            default_id = target.default_camera_id()
        out.append((given or default_id, camera))
    return out


class AnswersOut:
    """``--out``: every answer as a line of JSONL. The first write that fails (a full disk, an
    I/O error) is logged once and stops the node: every later one would fail alike, each with a
    traceback, while the node ran on writing nothing and exited 0."""

    def __init__(self, path: Path, stop: threading.Event) -> None:
        from client.sinks.jsonl import JsonlSink

        self._sink = JsonlSink(path)
        self._stop = stop
        self._lock = threading.Lock()  # each camera's answers come on its own thread
        self.error: DataError | None = None

    def write(self, frame: SourceFrame, result: FrameResult) -> None:
        with self._lock:
            if self.error is not None:
                return  # the node is stopping; the answers to frames in flight go unwritten
            try:
                self._sink.write(frame, result)
            except (DataError, OSError) as exc:
                self.error = exc if isinstance(exc, DataError) else DataError(f"{self._sink.path}: {exc}")
                log.error("writing answers failed: %s; stopping the node", self.error)
                self._stop.set()

    def close(self) -> None:
        self._sink.close()


def _print_summary(rows: list[CameraSummary], as_json: bool) -> None:
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        for r in rows:
            print(r.line())
    sys.stdout.flush()


def main(argv: list[str], stop: threading.Event | None = None) -> int:
    """Run the node until SIGTERM / SIGINT, ``--duration`` or ``stop`` (for callers that run
    it in a thread, where signal handlers cannot be installed)."""
    args = build_parser().parse_args(argv)
    from client.camera_node import CameraNode, FrameEncoding, NodeConfig
    from client.config import BackoffConfig
    from client.detector_client import DetectorClient

    if args.stats_every < 0 or args.duration < 0 or args.retry_max <= 0:
        raise ConfigError("--stats-every and --duration must not be negative, --retry-max must be positive")
    config = client_config(args, window=args.window, deadline_ms=args.deadline_ms)
    node_config = NodeConfig(
        encode=FrameEncoding(args.encode), jpeg_quality=args.jpeg_quality, shm_prefix=args.shm_prefix,
        shm_mode=args.shm_mode, shm_group=args.shm_group,
        retry=BackoffConfig(initial_s=min(0.5, args.retry_max), max_s=args.retry_max, give_up_after_s=0.0),
        options=(RequestOptions(score_threshold=args.score_threshold, track=args.track)
                 if args.score_threshold or args.track else None),
    )
    cameras = open_cameras(args)
    stop_event = stop or threading.Event()
    out: AnswersOut | None = None  # opened (truncating the file) once every argument has passed its checks

    def write(frame: SourceFrame, result: FrameResult) -> None:
        if out is not None:
            out.write(frame, result)

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("%s: stopping", signal.Signals(signum).name)
            stop_event.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    client = DetectorClient(config)
    node: CameraNode | None = None
    try:
        node = CameraNode(cameras, client, node_config, write if args.out else None, stop=stop_event)
        # Only now: a refused argument (two cameras with one id) used to leave the last run's
        # answers truncated to nothing.
        out = AnswersOut(args.out, stop_event) if args.out else None
        log.info("streaming %s to %s", ", ".join(f"{cid} ({cam.name})" for cid, cam in cameras),
                 ", ".join(e.address for e in client.pool.endpoints))
        node.start()
        try:
            node.wait(args.stats_every, lambda rows: print(format_table(rows), file=sys.stderr, flush=True),
                      args.duration)
        finally:
            node.stop()
        _print_summary(node.summaries(), args.json)
    finally:
        client.close()
        if out is not None:
            out.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = out.error if out is not None else None
    if stop is None and node is not None and node.stuck:
        # The node owns the process, and a camera's thread is stuck in OpenCV / FFmpeg, which
        # nothing interrupts: finalizing the interpreter under it can abort the process
        # (SIGABRT, exit -6, seen with three cameras that never answered). The summary and the
        # answers are out: end the process now, with the exit code it would have had.
        if failed:
            print(f"perception camera: error: writing answers failed, the node stopped: {failed}", file=sys.stderr)
        _exit_now(1 if failed else 0)
    if failed is not None:
        raise DataError(f"writing answers failed, the node stopped: {failed}") from failed
    return 0


def _exit_now(code: int) -> None:
    """End the process at once (no interpreter finalization), output flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
