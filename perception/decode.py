"""Decode frames to BGR uint8: encoded JPEG/PNG bytes, or raw pixels with a row stride.

Sizes are validated before anything is allocated, against limits a deployment can lower to its
cameras' resolutions. JPEGs are decoded strictly: a corrupt or truncated one is refused. A
JPEG much larger than the model input is decoded at reduced scale by libjpeg's DCT scaling
(measured 1.7-2.4x faster for 1920x1080 -> 640x360, docs/performance.md) when the caller
passes the input size it needs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
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


@dataclass(frozen=True)
class DecodeLimits:
    """What a frame may cost to decode, checked from its header before anything is allocated.

    max_pixels: any frame (JPEG, PNG or raw). max_full_buffer_pixels: frames whose decoder needs
    a full-size buffer whatever the output scale (a JPEG of several scans, progressive or one
    scan per component, keeps every DCT coefficient of the image; PNG inflates the whole image):
    a 97 KB PNG may declare 8192x4050 and cost 160 MB and most of a second. Lower both to the
    cameras' real resolutions on a vehicle.
    """

    max_side: int = MAX_SIDE
    max_pixels: int = MAX_PIXELS
    max_full_buffer_pixels: int = 3840 * 2160

    def __post_init__(self) -> None:
        if min(self.max_side, self.max_pixels, self.max_full_buffer_pixels) < 1:
            raise ValueError("decode limits must be positive")


DEFAULT_LIMITS = DecodeLimits()


def check_size(width: int, height: int, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"image size must be positive, got {width}x{height}")
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        raise InvalidInputError(
            f"image {width}x{height} exceeds the limit of {limits.max_side} per side / {limits.max_pixels} pixels"
        )


@dataclass(frozen=True)
class EncodedHeader:
    """What a JPEG/PNG header says, read without decoding: kind, size, and whether decoding
    needs a full-size buffer (``read_header``), and as what (e.g. "progressive JPEG")."""

    kind: str  # "jpeg" or "png"
    width: int
    height: int
    full_buffer: bool
    what: str = ""  # what the image is, for a refusal: "PNG", "progressive JPEG", ...


# Image bytes as the server holds them: its own bytes, or a view of a received message's bytes
# (server.wire keeps a frame's image out of protobuf's copies).
ImageBytes = bytes | memoryview


def _find_ff(data: ImageBytes, i: int) -> int:
    """The index of the next 0xFF byte at or after ``i``, or -1; linear in the distance found."""
    if isinstance(data, bytes):
        return data.find(b"\xff", i)
    step = 64
    while i < len(data):  # a view has no find: search growing windows of it
        j = bytes(data[i : i + step]).find(b"\xff")
        if j >= 0:
            return i + j
        i += step
        step = min(step * 2, 1 << 20)
    return -1


# Steps (segments, markers, fill bytes, gaps) read_header takes before the first scan header.
# Cameras' JPEGs have under 30 (APPn, DQT, DHT, DRI, COM, SOF, SOS); some encoders pad with a few
# fill bytes.
MAX_JPEG_HEADER_STEPS = 4096

# SOF markers (SOF0..SOF15 except DHT C4, JPG C8, DAC CC) by what libjpeg needs to decode them.
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_LOSSLESS = frozenset({0xC3, 0xC7, 0xCB, 0xCF})  # predictive, no DCT: nothing to decode at reduced scale
_HIERARCHICAL = frozenset({0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF})  # libjpeg refuses these anyway


def _sof_kind(marker: int) -> str:
    """What a frame of this SOF needs a full-size buffer as ("" for sequential DCT, SOF0/1/9,
    which needs one only when its first scan leaves components out: ``read_header``)."""
    if marker in _PROGRESSIVE:
        return "progressive JPEG"
    if marker in _LOSSLESS:
        return "lossless JPEG"
    if marker in _HIERARCHICAL:
        return "hierarchical JPEG"
    return ""


def read_header(data: ImageBytes) -> EncodedHeader:
    """Parse a JPEG/PNG header in time linear in its size, with no Python loop over bytes:
    segments are skipped by their length and any gap between them by a find. A header is a
    few dozen segments; one made of millions of length-less markers or fill bytes (FF D0 FF D0
    ...) would still be a Python step per two bytes, so the walk gives up after
    ``MAX_JPEG_HEADER_STEPS``.

    A JPEG's walk goes on from the frame header (SOF) to the first scan header (SOS): libjpeg
    decides from both whether it needs a buffer of every DCT coefficient of the image. It does
    for progressive JPEG, and for a sequential one whose first scan holds fewer components than
    the frame (one scan per component, "non-interleaved"): a 0.4 MB 7680x4320 JPEG of three
    such scans decoded with +190 MB RSS in 190 ms, its interleaved twin with +1 MB in 45 ms.
    Lossless and hierarchical JPEGs count as full-buffer too, and so does a JPEG whose first
    scan is not found within the steps (it is truncated, or hides it behind thousands of
    segments): only what is known to decode into a small buffer is let through as such."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n":
        w, h = struct.unpack(">II", data[16:24])
        return EncodedHeader("png", int(w), int(h), True, "PNG")
    if len(data) >= 4 and data[:2] == b"\xff\xd8":
        i, n = 2, len(data)
        frame: tuple[int, int, int, int] | None = None  # (SOF marker, width, height, components)
        for _ in range(MAX_JPEG_HEADER_STEPS):
            if i + 4 > n:
                break
            if data[i] != 0xFF:
                i = _find_ff(data, i)
                if i < 0:
                    break
                continue
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            if marker == 0xD9:  # end of image
                break
            if marker == 0xDA:  # start of scan: scan data follows, the header ends here
                if frame is not None and i + 5 <= n:
                    sof, w, h, nf = frame
                    what = _sof_kind(sof) or ("non-interleaved JPEG" if data[i + 4] < nf else "")
                    return EncodedHeader("jpeg", w, h, bool(what), what)
                break  # scan data before any frame header, or the scan header cut off
            seg_len = struct.unpack(">H", data[i + 2 : i + 4])[0]
            # SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC) carry the frame size.
            if frame is None and 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                if i + 10 > n:
                    break
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                frame = (marker, int(w), int(h), data[i + 9])
            if seg_len < 2:
                break
            i += 2 + seg_len
        else:
            if frame is None:
                raise InvalidInputError(
                    f"JPEG has more than {MAX_JPEG_HEADER_STEPS} markers or gaps before its frame header (corrupt)"
                )
        if frame is not None:  # a frame header, but no scan header found after it
            sof, w, h, _ = frame
            return EncodedHeader("jpeg", w, h, True, _sof_kind(sof) or "JPEG (no scan header found)")
        raise InvalidInputError("JPEG has no frame header (truncated or corrupt)")
    raise InvalidInputError("encoded image is neither JPEG nor PNG")


def encoded_size(data: ImageBytes) -> tuple[str, int, int]:
    """(kind, width, height) read from a JPEG/PNG header without decoding the pixels."""
    h = read_header(data)
    return h.kind, h.width, h.height


def reduction_factor(src_w: int, src_h: int, min_size: tuple[int, int] | None) -> int:
    """The scale divisor (1, 2, 4 or 8) ``decode_encoded`` uses for a JPEG of ``src_w x src_h``.

    The reduced image is ceil(src_w / f) x ceil(src_h / f) and covers f times that many source
    pixels, which can exceed the source size by up to f - 1 pixels per axis.
    """
    if min_size is None:
        return 1
    for factor in (8, 4, 2):
        if src_w // factor >= min_size[0] and src_h // factor >= min_size[1]:
            return factor
    return 1


def decode_encoded(
    data: ImageBytes, min_size: tuple[int, int] | None = None, limits: DecodeLimits = DEFAULT_LIMITS
) -> tuple[NDArray[np.uint8], int, int]:
    """Decode JPEG/PNG bytes to BGR (H, W, 3) uint8.

    Returns (image, source_width, source_height). With ``min_size=(w, h)``, a JPEG that is at
    least twice as large on both sides is decoded at 1/2, 1/4 or 1/8 scale, never below
    ``min_size``; the returned image is then smaller than the source size reported.

    JPEGs are decoded strictly (libjpeg-turbo through ``simplejpeg``): a corrupt or truncated
    one is InvalidInputError, never an image padded with grey. Limits are checked on the header,
    before any pixel is allocated.
    """
    if not data:
        raise InvalidInputError("frame has no image bytes")
    head = read_header(data)
    w, h = head.width, head.height
    check_size(w, h, limits)
    if head.full_buffer and w * h > limits.max_full_buffer_pixels:
        raise InvalidInputError(
            f"{head.what} {w}x{h} needs a full-size decode buffer; above the limit of "
            f"{limits.max_full_buffer_pixels} pixels for such images (send baseline JPEG of one interleaved scan, "
            "or raw pixels)"
        )
    if head.kind == "png":
        return _decode_png(data, w, h), w, h
    factor = 1 if head.full_buffer else reduction_factor(w, h, min_size)
    img = _decode_jpeg(data, -(-w // factor), -(-h // factor))
    # libjpeg's scaled decode rounds the size up: ceil(w / factor) x ceil(h / factor).
    expect = (-(-w // factor), -(-h // factor))
    if (img.shape[1], img.shape[0]) != expect:
        raise InvalidInputError(
            f"JPEG header says {w}x{h} but decoded {img.shape[1] * factor}x{img.shape[0] * factor}"
        )
    return img, w, h


def _decode_jpeg(data: ImageBytes, min_w: int, min_h: int) -> NDArray[np.uint8]:
    import simplejpeg

    try:
        # The smallest libjpeg-turbo scale giving at least (min_w, min_h) is exactly 1/factor.
        img = simplejpeg.decode_jpeg(data, colorspace="BGR", min_width=min_w, min_height=min_h, strict=True)
    except ValueError as exc:  # simplejpeg's one error type; strict turns libjpeg warnings into it
        raise InvalidInputError(f"JPEG could not be decoded (truncated or corrupt): {exc}") from None
    return cast(NDArray[np.uint8], img)


def _decode_png(data: ImageBytes, w: int, h: int) -> NDArray[np.uint8]:
    if b"IEND" not in bytes(data[-32:]):
        raise InvalidInputError("PNG is truncated (no IEND chunk)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | _NO_EXIF_ROTATION)
    if img is None:
        raise InvalidInputError("PNG could not be decoded (truncated or corrupt)")
    if (img.shape[1], img.shape[0]) != (w, h):
        raise InvalidInputError(f"PNG header says {w}x{h} but decoded {img.shape[1]}x{img.shape[0]}")
    return cast(NDArray[np.uint8], img)


def decode_raw(
    data: ImageBytes, width: int, height: int, pixel_format: int, row_stride: int = 0,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> NDArray[np.uint8]:
    """Raw pixels (BGR8, RGB8, GRAY8 or NV12) with an optional row stride -> BGR (H, W, 3)."""
    check_size(width, height, limits)
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
