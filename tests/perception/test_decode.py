"""Frame decoding: raw formats with stride, encoded headers, corrupt input, reduced-scale JPEG."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc

import cv2
import numpy as np
import pytest

from perception.decode import (
    MAX_ROW_PADDING,
    DecodeLimits,
    PixelFormat,
    decode_encoded,
    decode_raw,
    encoded_size,
    read_header,
)
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


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def flat_jpeg(w: int, h: int, interleaved: bool, sof: int = 0xC0, components: int = 3) -> bytes:
    """A valid baseline JPEG of a flat grey image, written by hand: no encoder at hand writes a
    scan per component. One Huffman code of one bit for DC difference 0 and one for end of
    block make every 8x8 block two zero bits, so the scans are zero bytes (1 MB at 8K, not a
    byte of 0xFF to stuff). ``interleaved``: one scan of every component (what cameras send),
    else one scan per component."""
    out = b"\xff\xd8" + _segment(0xDB, b"\x00" + bytes([1] * 64))
    ids = tuple(range(1, components + 1))
    out += _segment(sof, struct.pack(">BHHB", 8, h, w, components) + b"".join(bytes([c, 0x11, 0]) for c in ids))
    one_code = bytes([1] + [0] * 15) + b"\x00"  # one code of length 1, for symbol 0
    out += _segment(0xC4, b"\x00" + one_code + b"\x10" + one_code)  # DC table 0, AC table 0
    blocks = -(-w // 8) * -(-h // 8)

    def scan(of: tuple[int, ...]) -> bytes:
        bits = 2 * blocks * len(of)
        data = bytes(bits // 8) + (bytes([0xFF >> (bits % 8)]) if bits % 8 else b"")  # padded with 1 bits
        header = bytes([len(of)]) + b"".join(bytes([c, 0]) for c in of) + b"\x00\x3f\x00"
        return _segment(0xDA, header) + data

    out += scan(ids) if interleaved else b"".join(scan((c,)) for c in ids)
    return out + b"\xff\xd9"


def test_a_jpeg_of_one_scan_per_component_needs_a_full_buffer():
    """libjpeg keeps every DCT coefficient of a JPEG whose first scan leaves components out, as
    for a progressive one: a 0.4 MB 7680x4320 baseline JPEG of three scans decoded with +190 MB
    RSS (its interleaved twin +1 MB). The header walk goes on to the first scan to tell."""
    for interleaved in (True, False):  # the hand-written JPEGs are real ones
        out, w, h = decode_encoded(flat_jpeg(64, 48, interleaved))
        assert (w, h) == (64, 48) and out.shape == (48, 64, 3) and set(np.unique(out)) == {128}
    head = read_header(flat_jpeg(64, 48, interleaved=False))
    assert head.full_buffer and head.what == "non-interleaved JPEG"
    assert not read_header(flat_jpeg(64, 48, interleaved=True)).full_buffer
    assert not read_header(flat_jpeg(64, 48, interleaved=True, components=1)).full_buffer  # grey: one scan
    assert not read_header(cv2.imencode(".jpg", img())[1].tobytes()).full_buffer
    # Lossless and hierarchical frames, and a frame header with no scan after it, count as full-buffer.
    for sof, what in ((0xC3, "lossless JPEG"), (0xC5, "hierarchical JPEG"), (0xC2, "progressive JPEG")):
        head = read_header(flat_jpeg(64, 48, interleaved=True, sof=sof))
        assert head.full_buffer and head.what == what, (hex(sof), head)
    cut = flat_jpeg(64, 48, interleaved=True)
    head = read_header(cut[: cut.index(b"\xff\xda")])
    assert head.full_buffer and (head.width, head.height) == (64, 48)

    limits = DecodeLimits(max_full_buffer_pixels=1920 * 1080)
    big = flat_jpeg(7680, 4320, interleaved=False)
    assert len(big) < 400_000
    with pytest.raises(InvalidInputError, match="non-interleaved JPEG 7680x4320 needs a full-size decode buffer"):
        decode_encoded(big, (640, 384), limits)
    out, w, h = decode_encoded(flat_jpeg(7680, 4320, interleaved=True), (640, 384), limits)
    assert (w, h) == (7680, 4320) and out.shape == (540, 960, 3)  # reduced scale, no full buffer
