"""Turning recorded image messages into SourceFrames: compressed bytes go as-is, raw pixels
stay raw (re-encoding costs client CPU and image quality for nothing)."""

from __future__ import annotations

import logging

import cv2
import numpy as np

from client.frames import RawPixels, SourceFrame
from perception.decode import PixelFormat
from perception.errors import DataError

log = logging.getLogger(__name__)

# ROS sensor_msgs/Image encodings the wire carries without conversion.
_ROS_RAW = {
    "bgr8": PixelFormat.BGR8,
    "rgb8": PixelFormat.RGB8,
    "mono8": PixelFormat.GRAY8,
    "8uc1": PixelFormat.GRAY8,
    "nv12": PixelFormat.NV12,
}
# Encodings converted to BGR8 on the client (channel order / alpha / 16-bit).
_ROS_CONVERT = {
    "bgra8": (4, cv2.COLOR_BGRA2BGR),
    "rgba8": (4, cv2.COLOR_RGBA2BGR),
    "8uc3": (3, None),
    "mono16": (None, None),
}


class UnsupportedEncoding(DataError):
    """An image message in an encoding no camera frame has (a depth topic's 16UC1 or 32FC1)."""


def check_encoding(encoding: str, where: str) -> None:
    """UnsupportedEncoding unless a sensor_msgs/Image in ``encoding`` can be sent."""
    if encoding.lower() not in _ROS_RAW and encoding.lower() not in _ROS_CONVERT:
        raise UnsupportedEncoding(f"{where}: unsupported image encoding {encoding!r}")


def is_encoded_image(data: bytes) -> bool:
    return data[:2] == b"\xff\xd8" or data[:8] == b"\x89PNG\r\n\x1a\n"


def compressed_frame(camera_id: str, sequence: int, timestamp_ns: int, data: bytes, where: str) -> SourceFrame:
    """A CompressedImage payload: JPEG/PNG as-is; any other still-image format OpenCV reads
    (BMP, TIFF, WebP) is decoded and sent raw; a payload nothing reads (empty, damaged) is sent
    as it is, for the server to answer INVALID, as a damaged JPEG is."""
    data = bytes(data)
    if is_encoded_image(data):
        return SourceFrame(camera_id, sequence, timestamp_ns, encoded=data)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        # Raising here ended the whole replay at the first bad message; the frames after it got no record.
        log.warning("%s: %s; sent as it is, for the server to answer INVALID", where,
                    "empty compressed image" if not data else "compressed image is neither JPEG, PNG nor another "
                    "format OpenCV can read")
        return SourceFrame(camera_id, sequence, timestamp_ns, encoded=data)
    return bgr_frame(camera_id, sequence, timestamp_ns, img)


def bgr_frame(camera_id: str, sequence: int, timestamp_ns: int, image: np.ndarray, file_name: str = "") -> SourceFrame:
    """(H, W, 3) uint8 BGR pixels as a tightly packed raw frame."""
    img = np.ascontiguousarray(image)
    h, w = img.shape[:2]
    raw = RawPixels(w, h, PixelFormat.BGR8, img.tobytes())
    return SourceFrame(camera_id, sequence, timestamp_ns, raw=raw, file_name=file_name)


def ros_image_frame(
    camera_id: str,
    sequence: int,
    timestamp_ns: int,
    encoding: str,
    width: int,
    height: int,
    step: int,
    data: bytes,
    where: str,
) -> SourceFrame:
    """A sensor_msgs/Image: rgb8/bgr8/mono8/nv12 raw as recorded (row stride kept); bgra8,
    rgba8 and mono16 converted to BGR8."""
    enc = encoding.lower()
    data = bytes(data)
    if enc in _ROS_RAW:
        fmt = _ROS_RAW[enc]
        raw = RawPixels(int(width), int(height), fmt, data, row_stride=int(step))
        return SourceFrame(camera_id, sequence, timestamp_ns, raw=raw)
    check_encoding(encoding, where)
    w, h, step = int(width), int(height), int(step)
    if enc == "mono16":
        if len(data) < step * (h - 1) + w * 2 or step < w * 2:
            raise DataError(f"{where}: {encoding} image {w}x{h} (step {step}) has only {len(data)} bytes")
        buf16 = np.frombuffer(data, np.uint8)
        if len(buf16) < step * h:  # the last row's padding may be left out, as for 8-bit images
            buf16 = np.concatenate([buf16, np.zeros(step * h - len(buf16), np.uint8)])
        rows = buf16[: step * h].reshape(h, step)[:, : w * 2]
        img16 = np.ascontiguousarray(rows).view(np.uint16).reshape(h, w)
        gray = (img16 >> 8).astype(np.uint8)
        return bgr_frame(camera_id, sequence, timestamp_ns, cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    ch, code = _ROS_CONVERT[enc]
    assert ch is not None
    if len(data) < step * (h - 1) + w * ch:
        raise DataError(f"{where}: {encoding} image {w}x{h} has only {len(data)} bytes")
    buf = np.frombuffer(data, np.uint8)
    if len(buf) < step * h:
        buf = np.concatenate([buf, np.zeros(step * h - len(buf), np.uint8)])
    img = buf[: step * h].reshape(h, step)[:, : w * ch].reshape(h, w, ch)
    bgr = img if code is None else cv2.cvtColor(img, code)
    return bgr_frame(camera_id, sequence, timestamp_ns, bgr)


def camera_from_topic(topic: str) -> str:
    """"/cameras/front/image/compressed" -> "front"; otherwise the topic without slashes."""
    parts = [p for p in topic.split("/") if p]
    if len(parts) >= 2 and parts[0] in ("cameras", "camera"):
        return parts[1]
    skip = {"image", "image_raw", "compressed", "image_color", "image_rect", "image_rect_color"}
    kept = [p for p in parts if p not in skip]
    return "_".join(kept) or "camera"
