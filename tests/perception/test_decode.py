"""Frame decoding: raw formats with stride, encoded headers, corrupt input, reduced-scale JPEG."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc

import cv2
import numpy as np
import pytest

from perception.decode import MAX_ROW_PADDING, PixelFormat, decode_encoded, decode_raw, encoded_size
from perception.errors import InvalidInputError


def img(h=48, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("stride_pad", [0, 5, 64])
def test_raw_bgr_rgb_gray_with_stride(stride_pad):
    a = img()
    h, w = a.shape[:2]
    for fmt, src, expect in (
        (PixelFormat.BGR8, a, a),
        (PixelFormat.RGB8, a[:, :, ::-1], a),
        (PixelFormat.GRAY8, a[:, :, 0], cv2.cvtColor(a[:, :, 0], cv2.COLOR_GRAY2BGR)),
    ):
        row = src.reshape(h, -1)
        stride = row.shape[1] + stride_pad
        buf = np.zeros((h, stride), np.uint8)
        buf[:, : row.shape[1]] = row
        data = buf.tobytes()
        if stride_pad:
            data = data[:-stride_pad]  # the last row needs no padding
        out = decode_raw(data, w, h, fmt, stride if stride_pad else 0)
        np.testing.assert_array_equal(out, expect)


def test_raw_nv12_matches_opencv():
    # 2x2 blocks of one colour: 4:2:0 chroma subsampling loses nothing but rounding.
    a = cv2.resize(img(16, 24), (48, 32), interpolation=cv2.INTER_NEAREST)
    yuv = cv2.cvtColor(a, cv2.COLOR_BGR2YUV_I420)
    h, w = 32, 48
    y, u, v = yuv[:h], yuv[h : h + h // 4].reshape(-1), yuv[h + h // 4 :].reshape(-1)
    uv = np.stack([u, v], axis=1).reshape(h // 2, w)
    nv12 = np.concatenate([y, uv]).tobytes()
    out = decode_raw(nv12, w, h, PixelFormat.NV12)
    assert out.shape == (h, w, 3)
    expected = cv2.cvtColor(np.frombuffer(nv12, np.uint8).reshape(-1, w), cv2.COLOR_YUV2BGR_NV12)
    np.testing.assert_array_equal(out, expected)
    assert np.abs(out.astype(int) - a.astype(int)).mean() < 12


@pytest.mark.parametrize(
    "args, needle",
    [
        ((b"\0" * 10, 4, 4, PixelFormat.BGR8), "needs 48"),
        ((b"\0" * 100, 4, 4, PixelFormat.BGR8), "needs 48"),
        ((b"", 0, 4, PixelFormat.BGR8), "positive"),
        ((b"", 9000, 9000, PixelFormat.BGR8), "limit"),
        ((b"\0" * 48, 4, 4, 9), "unknown pixel format"),
        ((b"\0" * 48, 4, 4, PixelFormat.UNSPECIFIED), "no pixel format"),
        ((b"\0" * 30, 5, 4, PixelFormat.NV12), "even"),
    ],
)
def test_raw_bad_sizes_refused_before_allocation(args, needle):
    with pytest.raises(InvalidInputError, match=needle):
        decode_raw(*args)
    with pytest.raises(InvalidInputError, match="smaller than a row"):
        decode_raw(b"\0" * 48, 4, 4, PixelFormat.BGR8, row_stride=5)


def test_encoded_headers_and_corruption():
    a = img(90, 130)
    jpg = cv2.imencode(".jpg", a)[1].tobytes()
    png = cv2.imencode(".png", a)[1].tobytes()
    assert encoded_size(jpg) == ("jpeg", 130, 90) and encoded_size(png) == ("png", 130, 90)
    out, w, h = decode_encoded(png)
    np.testing.assert_array_equal(out, a)
    for bad, needle in ((b"", "no image"), (jpg[: len(jpg) // 2], "truncated"), (png[: len(png) // 2], "truncated"),
                        (b"BM" + bytes(50), "neither"), (b"\xff\xd8\xff\xe0" + bytes(20), "frame header|truncated")):
        with pytest.raises(InvalidInputError, match=needle):
            decode_encoded(bad)
    # A JPEG whose body is garbage but whose header and end marker are intact.
    corrupt = jpg[:200] + bytes(len(jpg) - 202) + b"\xff\xd9"
    # Refused, or decoded to something of the declared size: never a crash.
    with contextlib.suppress(InvalidInputError):
        decode_encoded(corrupt)


def test_reduced_scale_decode():
    big = cv2.resize(img(108, 192), (1920, 1080), interpolation=cv2.INTER_LINEAR)
    jpg = cv2.imencode(".jpg", big)[1].tobytes()
    out, w, h = decode_encoded(jpg, (640, 384))
    assert (w, h) == (1920, 1080) and out.shape == (540, 960, 3)  # 1/2: 1/4 would be below 640x384
    out, _, _ = decode_encoded(jpg, (320, 180))
    assert out.shape == (270, 480, 3)  # 1/4
    out, _, _ = decode_encoded(jpg, (1280, 720))
    assert out.shape == (1080, 1920, 3)


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """``jpeg`` with an APP1 EXIF segment whose only tag is Orientation, spliced after SOI."""
    # TIFF header (big endian), one IFD entry: tag 0x0112 SHORT count 1 value, no next IFD.
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + app1 + jpeg[2:]


@pytest.mark.parametrize("min_size", [None, (40, 20)])
def test_exif_rotated_jpeg_decodes_in_stored_orientation(min_size):
    rng = np.random.default_rng(3)
    img = cv2.resize(rng.integers(0, 255, (4, 8, 3), dtype=np.uint8), (80, 40), interpolation=cv2.INTER_NEAREST)
    data = _with_exif_orientation(cv2.imencode(".jpg", img)[1].tobytes(), 6)  # 6 = rotate 90 CW
    # Precondition: OpenCV's default decode honours the tag (otherwise this test proves nothing).
    default_decode = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert default_decode is not None and default_decode.shape[:2] == (80, 40)
    out, w, h = decode_encoded(data, min_size)
    factor = 1 if min_size is None else 2
    assert (w, h) == (80, 40) and out.shape == (40 // factor, 80 // factor, 3)


def test_raw_stride_never_allocates_the_padding():
    # A 1x1 BGR frame with the largest allowed stride: only the 3 pixel bytes are sent, and
    # nothing near the stride may be allocated (the old code padded the buffer to a stride).
    stride = 3 + MAX_ROW_PADDING
    tracemalloc.start()
    try:
        out = decode_raw(b"\x01\x02\x03", 1, 1, PixelFormat.BGR8, stride)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.tolist() == [[[1, 2, 3]]]
    assert peak < 8 * 1024, peak
    # Two rows: the second row starts one stride in.
    data = b"\x01\x02\x03" + bytes(stride - 3) + b"\x04\x05\x06"
    assert decode_raw(data, 1, 2, PixelFormat.RGB8, stride).tolist() == [[[3, 2, 1]], [[6, 5, 4]]]


@pytest.mark.parametrize("stride", [3 + MAX_ROW_PADDING + 1, 50_000_000])
def test_raw_absurd_stride_refused(stride):
    with pytest.raises(InvalidInputError, match="row_stride"):
        decode_raw(b"\x01\x02\x03", 1, 1, PixelFormat.BGR8, stride)
