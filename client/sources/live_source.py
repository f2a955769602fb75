"""Live cameras through OpenCV: V4L2 devices, network streams (RTSP, HTTP(S) MJPEG / H.264,
through FFmpeg) and GStreamer pipelines (only where the installed OpenCV has GStreamer; the
PyPI wheels do not).

``live_target(text)`` says whether a source argument names a live camera; ``LiveCapture`` opens and
reads one; ``LiveSource`` is the ``FrameSource`` a replay reads, until the stream ends.

Capture time: the stream's own clock (``CAP_PROP_POS_MSEC``) mapped once to epoch time, while
it keeps pace with the host clock; otherwise the host's monotonic clock mapped once to epoch
(capture_clock.py).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from client.capture_clock import CaptureClock
from client.frames import SourceFrame
from client.sources.base import SourceOptions
from client.sources.images import bgr_frame
from perception.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Schemes FFmpeg opens as a live stream.
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):(?P<slashes>//)(?P<rest>.*)$")
_DEVICE = re.compile(r"^/dev/video(?P<index>\d+)$")
# How long FFmpeg may wait to connect, and then for a frame, before a read fails and the
# camera counts as gone. Not a measurement: long enough for a slow RTSP handshake, short
# enough that an unplugged stream is noticed within seconds.
STREAM_TIMEOUT_MS = 5_000
# OpenCV's FFmpeg backend opens one stream at a time for the whole process: a camera that is
# off or unreachable held that lock for the whole open timeout, and every other camera's
# reconnect waited behind it (measured: a healthy camera's restart took 3.4 s to be answered
# again beside one dead camera, 8.1 s beside three). A TCP connect outside OpenCV first fails
# such a camera within this, holding nothing. A host that accepts the connection and then never
# answers still takes the open's own timeout.
CONNECT_CHECK_S = 2.0
# Where a stream scheme listens when its URL names no port.
_DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "rtmp": 1935, "http": 80, "https": 443}


# A URL's user and password, anywhere in a text (a GStreamer pipeline's rtspsrc location too):
# up to the LAST "@" of the authority, as FFmpeg splits it (a password may hold an "@").
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]+)@")
# Credentials a camera takes in its URL's query (``?user=admin&pwd=...``), and the properties a
# GStreamer source takes them as (``rtspsrc user-id=admin user-pw=...``).
_QUERY_SECRET = re.compile(r"(?P<key>[?&;](?:user(?:name)?|pass(?:word|wd)?|pwd|auth|token|access_token|api_?key|"
                           r"key|secret|sig(?:nature)?)=)[^&#\s]*", re.IGNORECASE)
_GST_SECRET = re.compile(r"(?P<key>\buser-(?:id|pw)\s*=\s*)(?:\"[^\"]*\"|'[^']*'|\S+)")


def without_credentials(text: str) -> str:
    """``text`` with every URL's user and password (an RTSP camera's usual
    ``rtsp://admin:secret@host/...``), the query's credentials (``?user=...&pwd=...``) and a
    GStreamer source's ``user-id`` / ``user-pw`` replaced by ``***``: the whole URL was the
    camera's name, in every log line and summary. ``udp://@:1234`` (a multicast address) has none."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m.group('key')}***", text)
    return _GST_SECRET.sub(lambda m: f"{m.group('key')}***", text)


def _check_connect(target: LiveTarget) -> None:
    """DataError unless the stream's host takes a TCP connection within CONNECT_CHECK_S
    (``CONNECT_CHECK_S`` says why); streams over UDP (udp://, srt://) and URLs without a host
    are left to FFmpeg."""
    try:
        url = urllib.parse.urlsplit(target.location)
        port = url.port or _DEFAULT_PORTS.get(url.scheme.lower())
        host = url.hostname
    except ValueError:  # a port that is no number: FFmpeg says what it makes of it
        return
    if not host or not port or url.scheme.lower() not in (*_DEFAULT_PORTS, "tcp"):
        return
    try:
        socket.create_connection((host, port), timeout=CONNECT_CHECK_S).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise DataError(f"{target.shown}: cannot open {target.kind.value}: {host}:{port} not reachable "
                        f"({reason})") from None


class LiveKind(Enum):
    """How a live camera is opened."""

    V4L2 = "V4L2 device"
    STREAM = "network stream"
    GSTREAMER = "GStreamer pipeline"


@dataclass(frozen=True)
class LiveTarget:
    """A live camera: how to open it and where (device path, URL or pipeline)."""

    kind: LiveKind
    location: str

    @property
    def shown(self) -> str:
        """``location`` as logs, errors and summaries print it (``without_credentials``)."""
        return without_credentials(self.location)

    def default_camera_id(self) -> str:
        """"/dev/video0" -> "video0", "rtsp://cam-front.local:8554/front" -> "front",
        "http://10.0.0.5:8080/" -> "10.0.0.5_8080", a pipeline -> "gstreamer"."""
        if self.kind is LiveKind.GSTREAMER:
            return "gstreamer"
        if self.kind is LiveKind.V4L2:
            return Path(self.location).name
        rest = _URL.match(self.location)
        tail = rest.group("rest") if rest else self.location
        host, _, path = tail.partition("/")
        host = host.rpartition("@")[2]  # no credentials in a camera id
        stem = Path(path.split("?")[0]).stem if path.split("?")[0] else ""
        name = stem or host
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "camera"


def live_target(source: str | os.PathLike[str]) -> LiveTarget | None:
    """The live camera ``source`` names, or None for a recording. Pass a URL as the string it
    is: ``Path("rtsp://host/x")`` has already collapsed it to "rtsp:/host/x", a file name."""
    text = os.fspath(source)
    match = _URL.match(text)
    if match and match.group("scheme").lower() in STREAM_SCHEMES:
        return LiveTarget(LiveKind.STREAM, f"{match.group('scheme')}://{match.group('rest')}")
    if text.startswith("/dev/video") or text.startswith("/dev/v4l/"):
        return LiveTarget(LiveKind.V4L2, text)
    if " ! " in text and not Path(text).exists():
        return LiveTarget(LiveKind.GSTREAMER, text)
    return None


@functools.lru_cache(maxsize=1)
def opencv_has_gstreamer() -> bool:
    """Whether the installed OpenCV was built with GStreamer (the PyPI wheels are not)."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return line.split(":", 1)[1].strip().upper().startswith("YES")
    return False


@dataclass(frozen=True)
class CaptureRequest:
    """What to ask a V4L2 device for (0 / "" = the driver's default). A driver may grant
    something else; ``LiveCapture`` logs what it got."""

    width: int = 0
    height: int = 0
    fps: float = 0.0
    fourcc: str = ""

    def __post_init__(self) -> None:
        if self.width < 0 or self.height < 0 or self.fps < 0:
            raise ConfigError("--width, --height and --fps must not be negative")
        if self.fourcc and len(self.fourcc) != 4:
            raise ConfigError(f"--fourcc must be four characters (MJPG, YUYV), got {self.fourcc!r}")


def _fourcc_text(value: float) -> str:
    code = int(value)
    return "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4)).strip("\x00")


class LiveCapture:
    """One live camera through OpenCV: ``open()``, then ``read()`` until it returns None (the
    camera is gone; ``open()`` again to retry), ``close()`` at the end. Not thread-safe: one
    capture thread owns it."""

    def __init__(self, target: LiveTarget, request: CaptureRequest | None = None) -> None:
        self.target = target
        self.request = request or CaptureRequest()
        self._cap: cv2.VideoCapture | None = None
        self._clock = CaptureClock()

    def open(self) -> None:
        """Connect; DataError with the reason when the camera cannot be opened."""
        self.close()
        t = self.target
        if t.kind is LiveKind.GSTREAMER:
            if not opencv_has_gstreamer():
                raise ConfigError(
                    "this OpenCV is built without GStreamer (the opencv-python-headless wheel from PyPI is); "
                    "use an rtsp:// or http:// URL (FFmpeg), or install an OpenCV built with GStreamer"
                )
            cap = cv2.VideoCapture(t.location, cv2.CAP_GSTREAMER)
        elif t.kind is LiveKind.V4L2:
            real = os.path.realpath(t.location)
            if not os.path.exists(real):
                raise DataError(f"{t.shown}: no such video device (unplugged, or another /dev/videoN)")
            index = _DEVICE.match(real)
            cap = cv2.VideoCapture(int(index.group("index")) if index else real, cv2.CAP_V4L2)
            if cap.isOpened():
                self._apply(cap)
        else:
            _check_connect(t)
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                      STREAM_TIMEOUT_MS]
            cap = cv2.VideoCapture(t.location, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise DataError(f"{t.shown}: cannot open {t.kind.value} (not reachable, busy or unsupported format)")
        self._cap = cap
        self._clock.reconnected()

    def _apply(self, cap: cv2.VideoCapture) -> None:
        r = self.request
        # FOURCC first: the sizes and rates a driver offers depend on the pixel format.
        if r.fourcc:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*r.fourcc))
        if r.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, r.width)
        if r.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, r.height)
        if r.fps:
            cap.set(cv2.CAP_PROP_FPS, r.fps)
        got = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
               float(cap.get(cv2.CAP_PROP_FPS)), _fourcc_text(cap.get(cv2.CAP_PROP_FOURCC)))
        log.info("%s: %dx%d at %.1f fps, %s", self.target.shown, *got)
        wanted = (r.width or got[0], r.height or got[1], r.fps or got[2], r.fourcc or got[3])
        if wanted != got:
            log.warning("%s: asked for %dx%d at %.1f fps %s; the driver gave %dx%d at %.1f fps %s",
                        self.target.shown, *wanted, *got)

    def read(self) -> tuple[NDArray[np.uint8], int] | None:
        """The next frame (H, W, 3) uint8 BGR and its capture time in epoch nanoseconds; None
        when the camera stopped delivering (unplugged, stream ended or timed out)."""
        if self._cap is None:
            return None
        ok, img = self._cap.read()
        if not ok or img is None:
            return None
        stamp_ms = float(self._cap.get(cv2.CAP_PROP_POS_MSEC) or 0.0)
        return np.asarray(img, np.uint8), self._clock.stamp(stamp_ms, self.target.shown)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class LiveSource:
    """A live camera read as a recording (``perception replay rtsp://...``): frames until the
    stream ends; iterating again reconnects. Raw BGR frames by default, JPEG with
    ``encode="jpeg"``."""

    def __init__(self, target: LiveTarget, options: SourceOptions) -> None:
        self.target = target
        self.path = Path(target.location)  # FrameSource's field; ``location`` is the exact text
        self.location = target.location
        self._opts = options
        self.camera_id = options.camera or target.default_camera_id()
        probe = LiveCapture(target)
        probe.open()  # fail now, with the reason, rather than after the server handshake
        probe.close()

    def describe(self) -> str:
        return f"live {self.target.kind.value} {self.target.shown}: camera {self.camera_id!r}"

    def __iter__(self) -> Iterator[SourceFrame]:
        cap = LiveCapture(self.target)
        cap.open()
        count = 0
        try:
            while True:
                got = cap.read()
                if got is None:
                    break
                img, ts = got
                if self._opts.encode == "jpeg":
                    yield SourceFrame(self.camera_id, count, ts, encoded=encode_jpeg(img, self._opts.jpeg_quality))
                else:
                    yield bgr_frame(self.camera_id, count, ts, img)
                count += 1
        finally:
            cap.close()
        if count == 0:
            raise DataError(f"{self.target.shown}: the stream delivered no frame")
        log.warning("%s: stream ended after %d frames", self.target.shown, count)


def encode_jpeg(image: NDArray[np.uint8], quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise DataError("a frame could not be JPEG-encoded")
    return bytes(buf.tobytes())
