"""Decode frames to BGR uint8: encoded JPEG/PNG bytes, or raw pixels with a row stride.

Sizes are validated before anything is allocated. A JPEG much larger than the model input is
decoded at reduced scale by libjpeg's DCT scaling (measured 1.7-2.4x faster for 1920x1080 ->
640x360, docs/performance.md) when the caller passes the input size it needs.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import cast

import cv2
import numpy as np
from numpy.typing import NDArray

from perception.errors import InvalidInputError

# 8K UHD; anything larger is refused before allocation.
MAX_SIDE = 8192
MAX_PIXELS = 7680 * 4320
# Row padding a raw frame may carry beyond its pixels. Camera drivers pad rows to an alignment
# (64..4096 bytes in V4L2/NVMM/ISP buffers), i.e. at most a few hundred bytes to a few KiB per
# row; 64 KiB is far above any of them and stops a client-chosen stride from dictating memory.
MAX_ROW_PADDING = 64 * 1024
# Decode in stored orientation: the header's size is what the client sent and what boxes
# refer to; OpenCV would otherwise rotate by the EXIF orientation tag.
_NO_EXIF_ROTATION = cv2.IMREAD_IGNORE_ORIENTATION


class PixelFormat(IntEnum):
    """Mirrors perception.v1.PixelFormat."""

    UNSPECIFIED = 0
    BGR8 = 1
    RGB8 = 2
    GRAY8 = 3
    NV12 = 4


def check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"image size must be positive, got {width}x{height}")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise InvalidInputError(
            f"image {width}x{height} exceeds the limit of {MAX_SIDE} per side / {MAX_PIXELS} pixels"
        )


def encoded_size(data: bytes) -> tuple[str, int, int]:
    """(kind, width, height) read from a JPEG/PNG header without decoding the pixels."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n":
        w, h = struct.unpack(">II", data[16:24])
        return "png", int(w), int(h)
    if len(data) >= 4 and data[:2] == b"\xff\xd8":
        i = 2
        n = len(data)
        while i + 4 <= n:
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 1 if marker == 0xFF else 2
                continue
            seg_len = struct.unpack(">H", data[i + 2 : i + 4])[0]
            # SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC) carry the frame size.
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                if i + 9 > n:
                    break
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return "jpeg", int(w), int(h)
            i += 2 + seg_len
        raise InvalidInputError("JPEG has no frame header (truncated or corrupt)")
    raise InvalidInputError("encoded image is neither JPEG nor PNG")


def reduction_factor(src_w: int, src_h: int, min_size: tuple[int, int] | None) -> int:
    """The scale divisor (1, 2, 4 or 8) ``decode_encoded`` uses for a JPEG of ``src_w x src_h``.

    The reduced image is ceil(src_w / f) x ceil(src_h / f) and covers f times that many source
    pixels, which can exceed the source size by up to f - 1 pixels per axis.
    """
    if min_size is None:
        return 1
    return _reduced_flag(src_w, src_h, min_size[0], min_size[1])[0]


def _reduced_flag(src_w: int, src_h: int, need_w: int, need_h: int) -> tuple[int, int]:
    """The largest libjpeg reduction (1, 2, 4, 8) that still leaves at least the needed size."""
    reductions = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
    for factor, flag in reductions:
        if src_w // factor >= need_w and src_h // factor >= need_h:
            return factor, flag | _NO_EXIF_ROTATION
    return 1, cv2.IMREAD_COLOR | _NO_EXIF_ROTATION


def decode_encoded(
    data: bytes, min_size: tuple[int, int] | None = None
) -> tuple[NDArray[np.uint8], int, int]:
    """Decode JPEG/PNG bytes to BGR (H, W, 3) uint8.

    Returns (image, source_width, source_height). With ``min_size=(w, h)``, a JPEG that is at
    least twice as large on both sides is decoded at 1/2, 1/4 or 1/8 scale, never below
    ``min_size``; the returned image is then smaller than the source size reported.
    """
    if not data:
        raise InvalidInputError("frame has no image bytes")
    kind, w, h = encoded_size(data)
    check_size(w, h)
    _check_complete(kind, data)
    factor, flag = 1, cv2.IMREAD_COLOR | _NO_EXIF_ROTATION
    if kind == "jpeg" and min_size is not None:
        factor, flag = _reduced_flag(w, h, min_size[0], min_size[1])
    buf = np.frombuffer(data, np.uint8)
    decoded = cv2.imdecode(buf, flag)
    if decoded is None:
        raise InvalidInputError(f"{kind.upper()} could not be decoded (truncated or corrupt)")
    # The (reduced) colour flags always decode to 8-bit BGR; OpenCV's stub admits any depth.
    img = cast(NDArray[np.uint8], decoded)
    # libjpeg's scaled decode rounds the size up: ceil(w / factor) x ceil(h / factor).
    expect = (-(-w // factor), -(-h // factor))
    if (img.shape[1], img.shape[0]) != expect:
        raise InvalidInputError(
            f"{kind.upper()} header says {w}x{h} but decoded {img.shape[1] * factor}x{img.shape[0] * factor}"
        )
    return img, w, h


def _check_complete(kind: str, data: bytes) -> None:
    """Refuse an image cut short: libjpeg would otherwise pad a truncated JPEG with grey."""
    # Some encoders pad after the end-of-image marker; a few dozen bytes of slack covers them.
    if kind == "jpeg" and b"\xff\xd9" not in data[-64:]:
        raise InvalidInputError("JPEG is truncated (no end-of-image marker)")
    if kind == "png" and b"IEND" not in data[-32:]:
        raise InvalidInputError("PNG is truncated (no IEND chunk)")


def decode_raw(
    data: bytes, width: int, height: int, pixel_format: int, row_stride: int = 0
) -> NDArray[np.uint8]:
    """Raw pixels (BGR8, RGB8, GRAY8 or NV12) with an optional row stride -> BGR (H, W, 3)."""
    check_size(width, height)
    try:
        fmt = PixelFormat(pixel_format)
    except ValueError as exc:
        raise InvalidInputError(f"unknown pixel format {pixel_format}") from exc
    if fmt == PixelFormat.UNSPECIFIED:
        raise InvalidInputError("raw frame has no pixel format")
    bpp = {PixelFormat.BGR8: 3, PixelFormat.RGB8: 3, PixelFormat.GRAY8: 1, PixelFormat.NV12: 1}[fmt]
    row = width * bpp
    stride = row_stride or row
    if stride < row:
        raise InvalidInputError(f"row_stride {stride} is smaller than a row of {row} bytes")
    if stride > row + MAX_ROW_PADDING:
        raise InvalidInputError(
            f"row_stride {stride} pads a row of {row} bytes by more than {MAX_ROW_PADDING} bytes"
        )
    if fmt == PixelFormat.NV12:
        if width % 2 or height % 2:
            raise InvalidInputError(f"NV12 needs even width and height, got {width}x{height}")
        rows = height + height // 2
    else:
        rows = height
    # The last row needs only `row` bytes, not a whole stride.
    need = stride * (rows - 1) + row
    if len(data) < need or len(data) > stride * rows:
        raise InvalidInputError(
            f"raw {fmt.name} {width}x{height} (stride {stride}) needs {need}..{stride * rows} bytes, got {len(data)}"
        )
    # A read-only strided view of the rows: nothing is copied or padded before the one copy
    # below, whatever the stride (the last row may end right after its pixels).
    buf = np.frombuffer(data, np.uint8, count=need)
    plane = np.lib.stride_tricks.as_strided(buf, shape=(rows, row), strides=(stride, 1), writeable=False)
    # cvtColor keeps the 8-bit depth of its input; OpenCV's stub admits any depth.
    if fmt == PixelFormat.NV12:
        return cast(NDArray[np.uint8], cv2.cvtColor(np.ascontiguousarray(plane), cv2.COLOR_YUV2BGR_NV12))
    if fmt == PixelFormat.GRAY8:
        return cast(NDArray[np.uint8], cv2.cvtColor(np.ascontiguousarray(plane), cv2.COLOR_GRAY2BGR))
    img = plane.reshape(height, width, 3)
    if fmt == PixelFormat.RGB8:
        return np.ascontiguousarray(img[:, :, ::-1])
    return np.ascontiguousarray(img)
