"""Frames in shared memory (proto SharedMemoryRef) against a real server on loopback.

A valid slot gets the same detections as the same pixels sent raw; every corrupted reference
is answered INVALID with its reason, its pixels are never read (``server.shm._pread`` is
watched), the stream goes on and the server stays healthy.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from client.convert import shm_ref
from client.shm_ring import HEADER_SIZE, ShmRing
from perception.decode import PixelFormat
from perception.errors import ConfigError, InvalidInputError
from perception.pipeline import SharedMemorySlot
from perception.v1 import detector_pb2 as pb
from perception.v1 import detector_pb2_grpc as pb_grpc
from server import shm as server_shm
from server.config import ServerConfig
from server.shm import ShmReader
from tests.server.conftest import health_check, jpeg, occupy_the_decoder, request, wait_for

OK = pb.FRAME_STATUS_OK
INVALID = pb.FRAME_STATUS_INVALID
PREFIX = f"perception-test-{os.getpid()}-"


def _image(seed: int = 5, w: int = 120, h: int = 90) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _shm_request(camera: str, seq: int, ref: pb.SharedMemoryRef | SharedMemorySlot) -> pb.DetectRequest:
    if isinstance(ref, SharedMemorySlot):
        ref = shm_ref(ref)
    return pb.DetectRequest(frame=pb.Frame(camera_id=camera, sequence=seq, capture_timestamp_ns=seq, shm=ref))


def _raw_request(camera: str, seq: int, img: np.ndarray) -> pb.DetectRequest:
    h, w = img.shape[:2]
    raw = pb.RawImage(width=w, height=h, format=pb.PIXEL_FORMAT_BGR8, data=img.tobytes())
    return pb.DetectRequest(frame=pb.Frame(camera_id=camera, sequence=seq, capture_timestamp_ns=seq, raw=raw))


def _lockstep(stub: Any, requests: list[pb.DetectRequest]) -> list[pb.DetectResponse]:
    """One stream, each request sent after the previous answer (no stale drops)."""
    turn = threading.Semaphore(1)

    def gen() -> Iterator[pb.DetectRequest]:
        for r in requests:
            turn.acquire()
            yield r

    out = []
    for a in stub.StreamDetect(gen(), timeout=30):
        out.append(a)
        turn.release()
    return out


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every (size, offset) the server reads out of a segment."""
    seen: list[tuple[int, int]] = []
    real = os.pread

    def watched(fd: int, size: int, offset: int) -> bytes:
        seen.append((size, offset))
        return real(fd, size, offset)

    monkeypatch.setattr(server_shm, "_pread", watched)
    return seen


@pytest.fixture
def ring() -> Iterator[Callable[..., ShmRing]]:
    made: list[ShmRing] = []

    def make(slots: int = 4, slot_bytes: int = 120 * 90 * 3, prefix: str = PREFIX) -> ShmRing:
        r = ShmRing(slots, slot_bytes, prefix=prefix)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_a_shm_frame_gets_the_detections_of_the_same_pixels_sent_raw(serve: Any, ring: Any) -> None:
    run = serve(shm_allow=PREFIX)
    r = ring()
    img = _image()
    nv12 = np.random.default_rng(1).integers(0, 255, (90 * 3 // 2, 120), dtype=np.uint8)
    reqs = [_raw_request("front", 1, img), _shm_request("front", 2, r.write(img)),
            _raw_request("front", 3, img[:, :, ::-1].copy()), _shm_request("front", 4, r.write(img[:, :, ::-1])),
            pb.DetectRequest(frame=pb.Frame(camera_id="front", sequence=5, raw=pb.RawImage(
                width=120, height=90, format=pb.PIXEL_FORMAT_NV12, data=nv12.tobytes()))),
            _shm_request("front", 6, r.write(nv12, PixelFormat.NV12))]
    out = _lockstep(run.stub, reqs)
    assert [a.status for a in out] == [OK] * 6, [a.message for a in out]
    boxes = [[(d.class_id, round(d.box.x1, 3), round(d.box.y2, 3), round(d.score, 5)) for d in a.detections]
             for a in out]
    assert boxes[0] and boxes[0] == boxes[1]
    assert boxes[2] == boxes[3] and boxes[4] == boxes[5]
    assert (out[1].image_width, out[1].image_height) == (120, 90)
    # Unary Detect takes them too.
    resp = run.stub.Detect(_shm_request("front", 7, r.write(img)), timeout=10)
    assert resp.status == OK and [(d.class_id, round(d.box.x1, 3), round(d.box.y2, 3), round(d.score, 5))
                                  for d in resp.detections] == boxes[0]


def test_corrupted_references_are_invalid_never_read_and_the_stream_goes_on(
    serve: Any, ring: Any, reads: list[tuple[int, int]]
) -> None:
    run = serve(shm_allow=PREFIX, invalid_backoff_max_s=0)  # a stream of bad references, on purpose
    good = ring()
    img = _image()
    valid = shm_ref(good.write(img))
    small = ring(slots=2)
    stale = shm_ref(small.write(img))
    small.write(img)
    small.write(img)  # slot 0 again: `stale` now names an overwritten slot
    foreign = shared_memory.SharedMemory(name=f"other-proc-{os.getpid()}", create=True, size=1 << 16)
    link = f"{PREFIX}link"
    os.symlink(f"/dev/shm/{foreign.name}", f"/dev/shm/{link}")
    fifo = f"{PREFIX}fifo"
    os.mkfifo(f"/dev/shm/{fifo}")

    def bad(**change: Any) -> pb.SharedMemoryRef:
        ref = pb.SharedMemoryRef()
        ref.CopyFrom(valid)
        for k, v in change.items():
            setattr(ref, k, v)
        return ref

    big = 1920 * 1080 * 3
    # (reference, what the message says, whether the slot's header may be read: a header read
    # is what finds a stale generation; every other check comes before any read)
    cases: list[tuple[pb.SharedMemoryRef, str, bool]] = [
        (bad(offset=good.segment_bytes), "past the segment", False),
        (bad(offset=2**63), "past the segment", False),
        (bad(offset=good.segment_bytes - HEADER_SIZE), "past the segment", False),
        (bad(offset=100), "multiple of 64", False),
        (bad(byte_size=valid.byte_size + 1), "byte_size says", False),
        (bad(byte_size=2**64 - 1), "byte_size says", False),
        (bad(width=1920, height=1080, byte_size=big), "past the segment", False),
        (bad(width=100000, height=100000, byte_size=100000 * 100000 * 3), "limit", False),
        (bad(row_stride=10**6), "row_stride", False),
        (bad(format=pb.PIXEL_FORMAT_UNSPECIFIED), "no pixel format", False),
        (stale, "stale shared-memory slot", True),
        (bad(generation=valid.generation + 2), "stale shared-memory slot", True),
        (bad(generation=valid.generation - 1), "stale shared-memory slot", True),
        (bad(offset=64 * 4), "bad magic", True),
        (bad(segment=foreign.name), "outside the prefix", False),
        (bad(segment=f"{PREFIX}../{foreign.name}"), "not a plain name", False),
        (bad(segment=f"{PREFIX}/x"), "not a plain name", False),
        (bad(segment=".."), "not a plain name", False),
        (bad(segment=""), "names no segment", False),
        (bad(segment=f"{PREFIX}missing"), "no shared-memory segment", False),
        (bad(segment=link), "cannot be opened", False),
        (bad(segment=fifo), "not a regular file", False),
    ]
    try:
        reqs = [_shm_request("front", 0, valid)]
        for i, (ref, _, _) in enumerate(cases):
            reqs += [_shm_request("front", 2 * i + 1, ref), request("front", 2 * i + 2, jpeg())]
        reads.clear()
        out = _lockstep(run.stub, reqs)
    finally:
        os.unlink(f"/dev/shm/{link}")
        os.unlink(f"/dev/shm/{fifo}")
        foreign.close()
        foreign.unlink()
    assert len(out) == len(reqs)
    assert out[0].status == OK
    for i, (ref, needle, _) in enumerate(cases):
        answer, after = out[2 * i + 1], out[2 * i + 2]
        assert answer.status == INVALID and needle in answer.message, (i, ref, answer.message)
        assert after.status == OK, (i, after.message)  # the stream goes on
    # Pixels were read once: the valid frame's (header, pixels, generation again). Each
    # corrupted reference read at most its slot's 24-byte header, inside the segment.
    pixel_reads = [r for r in reads if r[0] > 64]
    assert pixel_reads == [(valid.byte_size, valid.offset + HEADER_SIZE)]
    header_reads = [r for r in reads if r[0] == 24]
    assert len(header_reads) == 1 + sum(h for _, _, h in cases)
    check = health_check(run.channel)
    assert check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING
    assert run.stub.Detect(_shm_request("front", 99, good.write(img)), timeout=10).status == OK


def test_shm_is_off_unless_the_server_allows_a_prefix(serve: Any, ring: Any, reads: list[tuple[int, int]]) -> None:
    run = serve()
    ref = ring().write(_image())
    out = _lockstep(run.stub, [_shm_request("front", 1, ref), request("front", 2, jpeg())])
    assert [a.status for a in out] == [INVALID, OK]
    assert "shared-memory frames are off" in out[0].message and "--shm-allow" in out[0].message
    assert reads == []


def test_a_camera_outside_the_allow_list_is_refused_before_its_slot_is_opened(
    serve: Any, ring: Any, reads: list[tuple[int, int]]
) -> None:
    run = serve(shm_allow=PREFIX, cameras=("front",))
    ref = ring().write(_image())
    out = _lockstep(run.stub, [_shm_request("intruder", 1, ref), _shm_request("front", 2, ref)])
    assert [a.status for a in out] == [INVALID, OK]
    assert "allow-list" in out[0].message
    assert len([r for r in reads if r[0] > 64]) == 1


@pytest.mark.parametrize("prefix", ["", "/dev/shm/x", "../x", ".hidden", "a/b", "a b"])
def test_the_prefix_must_be_a_plain_name(tiny_manifest: Any, prefix: str) -> None:
    if not prefix:  # "" is off, not an error
        assert ServerConfig(model=str(tiny_manifest), shm_allow=prefix).shm_allow == ""
        return
    with pytest.raises(ConfigError, match="plain segment-name prefix"):
        ServerConfig(model=str(tiny_manifest), shm_allow=prefix)


# -- the reader alone: what no client can do through the RPC in a test's time ----------------


def test_a_slot_overwritten_during_the_copy_is_refused(ring: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    r = ring(slots=1)
    ref = r.write(_image())
    reader = ShmReader(PREFIX)
    real = os.pread

    def producer_overwrites_during_copy(fd: int, size: int, offset: int) -> bytes:
        data = real(fd, size, offset)
        if size > 64:
            r.write(_image(6))  # the producer wraps around onto the slot being copied
        return data

    monkeypatch.setattr(server_shm, "_pread", producer_overwrites_during_copy)
    with pytest.raises(InvalidInputError, match="overwritten while it was read"):
        reader.read(ref)
    reader.close()


def test_a_segment_shrunk_under_a_cached_descriptor_is_a_short_read_not_a_crash(ring: Any) -> None:
    r = ring(slots=2)
    ref = r.write(_image())
    reader = ShmReader(PREFIX)
    assert reader.read(ref).data == _image().tobytes()
    assert reader.open_segments == 1
    os.truncate(f"/dev/shm/{r.name}", 100)  # a hostile producer shrinks its segment
    with pytest.raises(InvalidInputError, match="past the segment"):
        reader.read(ref)
    reader.close()


def test_a_recreated_segment_is_reopened_and_open_segments_are_bounded(ring: Any) -> None:
    reader = ShmReader(PREFIX, max_open=2)
    img = _image()
    rings = [ring(slots=1) for _ in range(3)]
    for r in rings:
        ref = r.write(img)
        assert reader.read(ref).data == img.tobytes()
    assert reader.open_segments == 2
    # The producer restarts under the same name: the server reads the new segment, not the old.
    name = rings[-1].name
    rings[-1].close()
    with pytest.raises(InvalidInputError, match="no shared-memory segment"):
        reader.read(ref)
    again = ShmRing(1, img.nbytes, name=name)
    try:
        ref = again.write(img[::-1].copy())
        assert reader.read(ref).data == img[::-1].tobytes()
    finally:
        again.close()
        reader.close()


def test_the_serve_flag_sets_the_prefix(tiny_manifest: Any) -> None:
    from server.cli import _flags, build_parser
    from server.config import load_config

    args = build_parser().parse_args(["--model", str(tiny_manifest), "--shm-allow", PREFIX, "--shm-max-open", "4"])
    config = load_config(_flags(args), env={})
    assert (config.shm_allow, config.shm_max_open) == (PREFIX, 4)
    assert load_config({"model": str(tiny_manifest)}, env={}).shm_allow == ""  # off by default


def test_row_padding_is_bounded_over_the_whole_frame_not_only_per_row() -> None:
    """Cameras' pitches (alignment to 64..4096 bytes) pass; 64 KiB on each of a tall, narrow
    frame's rows does not (it was an 855 MB copy for a frame of 50 MB of pixels)."""
    nv12, bgr8 = int(PixelFormat.NV12), int(PixelFormat.BGR8)
    assert server_shm.slot_bytes(1920, 1080, nv12, 2048) == (2048, 2048 * 1620)  # Jetson NVMM pitch
    assert server_shm.slot_bytes(640, 480, nv12, 1024) == (1024, 1024 * 720)  # 512-aligned rows
    assert server_shm.slot_bytes(1920, 1080, bgr8, 8192) == (8192, 8192 * 1080)  # 4096-aligned rows
    assert server_shm.slot_bytes(7680, 4320, nv12, 8192) == (8192, 8192 * 6480)
    assert server_shm.slot_bytes(4050, 8192, nv12, 4096) == (4096, 4096 * 12288)
    with pytest.raises(InvalidInputError, match="pads its 12288 rows of 4050 bytes by 805306368 bytes in all"):
        server_shm.slot_bytes(4050, 8192, nv12, 4050 + 65536)


def test_a_tall_narrow_frame_with_padded_rows_is_refused_before_it_is_copied(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ~100-byte reference to a sparse segment (no memory until read) with a valid slot
    header: the old check passed it and pread allocated 855 MB. Refused now, nothing read."""
    width, height, stride = 4050, 8192, 4050 + 65536
    byte_size = stride * (height * 3 // 2)
    assert byte_size == 855_072_768
    seen: list[int] = []
    real = os.pread

    def bounded(fd: int, size: int, offset: int) -> bytes:
        seen.append(size)
        if size > 64 << 20:  # what the old code did; refuse here instead of allocating it
            raise MemoryError(f"a {size}-byte read out of shared memory")
        return real(fd, size, offset)

    monkeypatch.setattr(server_shm, "_pread", bounded)
    run = serve(shm_allow=PREFIX, invalid_backoff_max_s=0)
    name = f"{PREFIX}sparse"
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, HEADER_SIZE + byte_size)  # sparse: costs nothing until read
        os.pwrite(fd, server_shm.HEADER.pack(server_shm.MAGIC, 2, byte_size), 0)
        ref = pb.SharedMemoryRef(segment=name, offset=0, byte_size=byte_size, generation=2, width=width,
                                 height=height, row_stride=stride, format=pb.PIXEL_FORMAT_NV12)
        assert len(ref.SerializeToString()) < 100
        out = _lockstep(run.stub, [_shm_request("front", 1, ref), request("front", 2, jpeg())])
    finally:
        os.close(fd)
        os.unlink(f"/dev/shm/{name}")
    assert [a.status for a in out] == [INVALID, OK], [a.message for a in out]
    assert "805306368 bytes in all" in out[0].message, out[0].message
    assert seen == []  # refused before the segment was opened


def test_shm_frames_are_copied_in_a_decode_slot_not_while_they_wait_for_one(
    serve: Any, ring: Any, reads: list[tuple[int, int]]
) -> None:
    """A ~100-byte reference is all the undecoded-bytes budgets see of a shared-memory frame.
    It was copied out of its slot before the frame waited for a decode slot, so every stream
    and unary call could hold a full copy (up to ~112 MB at the 8K limit) while it waited: 32
    streams and 12 calls, ~4.9 GB. Now nothing is copied until the frame has its slot."""
    run = serve(shm_allow=PREFIX, decode_threads=1)
    limits = run.server.limits
    assert limits is not None
    r = ring(slots=8)
    img = _image()
    refs = [r.write(img) for _ in range(5)]
    unary: list[int] = []

    def detect(i: int) -> None:
        unary.append(run.stub.Detect(_shm_request(f"cam{i}", i, refs[i]), timeout=30).status)

    callers = [threading.Thread(target=detect, args=(i,)) for i in (3, 4)]
    hold = occupy_the_decoder(limits)
    try:
        streams = [run.stub.StreamDetect(iter([_shm_request(f"cam{i}", i, refs[i])]), timeout=30) for i in range(3)]
        for t in callers:
            t.start()
        assert wait_for(lambda: len(limits.decode._waiting) == 5, 10)  # 3 streams and 2 calls wait
        assert [n for n, _ in reads if n > 64] == []  # no copy made while they wait
    finally:
        hold.set()
        for t in callers:
            t.join(30)
    assert [a.status for call in streams for a in call] == [OK] * 3 and unary == [OK, OK]
    assert len([n for n, _ in reads if n > 64]) == 5


def test_a_sparse_segment_is_refused_before_its_pixels_are_read(reads: list[tuple[int, int]]) -> None:
    """A segment of holes with one valid header costs its maker a page, and the copy of a frame
    read out of it as much memory as a real one (t2: four references to an 8K frame, +427 MB)."""
    width, height = 640, 480
    need = width * height * 3
    name = f"{PREFIX}sparse-holes"
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    reader = ShmReader(PREFIX)
    try:
        os.ftruncate(fd, HEADER_SIZE + need)
        os.pwrite(fd, server_shm.HEADER.pack(server_shm.MAGIC, 2, need), 0)
        ref = SharedMemorySlot(name, 0, need, 2, width, height, 0, int(PixelFormat.BGR8))
        with pytest.raises(InvalidInputError, match="sparse"):
            reader.read(ref)
        assert reads == []
        os.pwrite(fd, bytes(need), HEADER_SIZE)  # the producer writes the pixels (black ones, too)
        assert reader.read(ref).data == bytes(need)
    finally:
        reader.close()
        os.close(fd)
        os.unlink(f"/dev/shm/{name}")


@pytest.mark.parametrize(("peer", "local"), [
    ("ipv4:127.0.0.1:50000", True), ("ipv4:127.8.9.10:1", True), ("ipv6:%5B::1%5D:50000", True),
    ("ipv6:[::1]:50000", True), ("ipv6:%5B::ffff:127.0.0.1%5D:50000", True), ("unix:/run/perception.sock", True),
    ("unix:", True), ("unix-abstract:perception", True),
    ("ipv4:10.0.0.5:50000", False), ("ipv4:192.0.2.2:1", False), ("ipv6:%5Bfe80::1%25eth0%5D:50000", False),
    ("ipv6:%5B::ffff:10.0.0.5%5D:50000", False), ("ipv6:%5B2001:db8::1%5D:1", False), ("ipv4:localhost:1", False),
    ("", False), ("127.0.0.1:1", False),
])
def test_local_peers_are_loopback_or_unix_sockets(peer: str, local: bool) -> None:
    assert server_shm.local_peer(peer) is local


def _an_address_not_on_loopback() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP: sends nothing, only picks the route's source address
        except OSError:
            pytest.skip("this host has no network address besides loopback")
        address: str = s.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("this host has no network address besides loopback")
    return address


def test_shm_frames_are_refused_from_a_client_not_on_loopback(
    serve: Any, ring: Any, reads: list[tuple[int, int]]
) -> None:
    """Anyone who could reach the port could have the server read any slot it can read; the
    flag says "from clients on this host". A client that reaches it through another address
    is refused before anything is opened, on a stream and in a unary call."""
    address = _an_address_not_on_loopback()
    run = serve(channel=False, host=address, shm_allow=PREFIX)
    ref = ring().write(_image())
    with grpc.insecure_channel(f"{address}:{run.port}") as channel:
        stub = pb_grpc.DetectorStub(channel)
        out = _lockstep(stub, [_shm_request("front", 1, ref), request("front", 2, jpeg())])
        with pytest.raises(grpc.RpcError) as err:
            stub.Detect(_shm_request("front", 3, ref), timeout=10)
    assert [a.status for a in out] == [INVALID, OK]
    assert "only from a client on the server's host" in out[0].message
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only from a client on the server's host" in (err.value.details() or "")
    assert reads == []


def test_a_client_on_ipv6_loopback_is_on_this_host(serve: Any, ring: Any) -> None:
    """gRPC names an IPv6 peer as a URI, brackets escaped (``ipv6:%5B::1%5D:port``)."""
    try:
        run = serve(channel=False, host="::1", shm_allow=PREFIX)
    except ConfigError:
        pytest.skip("this host has no IPv6 loopback")
    with grpc.insecure_channel(f"[::1]:{run.port}") as channel:
        resp = pb_grpc.DetectorStub(channel).Detect(_shm_request("front", 1, ring().write(_image())), timeout=10)
    assert resp.status == OK, resp.message


def test_refusals_do_not_tell_what_the_segment_holds(ring: Any) -> None:
    """The slot's generation is what a reference must name: a refusal that said it ("the slot
    holds generation 18") let a client that cannot read a ring have the server read any frame
    of it, in two requests. Nor the segment's size, nor the slot's byte size."""
    r = ring(slots=2)
    img = _image()
    for _ in range(9):
        ref = r.write(img)
    reader = ShmReader(PREFIX)
    # (a guess, what its refusal says, what it must not say: the guess's own numbers aside)
    guesses = [
        (dataclasses.replace(ref, generation=0), "stale", [ref.generation]),
        (dataclasses.replace(ref, offset=r.segment_bytes - 128), "past the segment", [r.segment_bytes]),
        (dataclasses.replace(ref, width=60, byte_size=60 * 90 * 3), "byte_size", [ref.byte_size]),
    ]
    try:
        for guess, needle, secrets in guesses:
            with pytest.raises(InvalidInputError, match=needle) as err:
                reader.read(guess)
            told = str(err.value)
            assert not any(re.search(rf"\b{n}\b", told) for n in secrets), told
    finally:
        reader.close()


def test_a_segment_its_producer_unlinked_is_closed_at_the_next_read(ring: Any) -> None:
    """A camera node that restarts makes a ring of a new name and unlinks the old one; the
    server kept the old one open (and its memory in tmpfs) until --shm-max-open newer names
    pushed it out: 6 restarts of a 1080p node held 355 MB."""
    reader = ShmReader(PREFIX)
    img = _image()
    try:
        for _ in range(3):  # the node restarts twice
            r = ring(slots=2)
            assert reader.read(r.write(img)).data == img.tobytes()
            assert reader.open_segments == 1
            r.close()
        assert _deleted_segments_open() == 1  # the last ring, until the next read
        again = ring(slots=2)
        reader.read(again.write(img))
        assert _deleted_segments_open() == 0 and reader.open_segments == 1
    finally:
        reader.close()


def _deleted_segments_open() -> int:
    """Descriptors of this process on unlinked segments of this test's prefix."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        n += target.startswith(f"/dev/shm/{PREFIX}") and target.endswith(" (deleted)")
    return n


def test_a_file_of_another_filesystem_mounted_under_the_prefix_is_refused(tmp_path: Any) -> None:
    """Only files of /dev/shm's own filesystem are segments: a file mounted over a name there
    (FUSE, a bind mount) is refused before it is read. Needs the right to mount (root)."""
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a file needs root")
    width, height = 16, 8
    need = width * height * 3
    source = tmp_path / "slot"
    source.write_bytes(server_shm.HEADER.pack(server_shm.MAGIC, 2, need) + bytes(HEADER_SIZE - 24 + need))
    if os.stat(source).st_dev == os.stat("/dev/shm").st_dev:
        pytest.skip(f"{tmp_path} is on /dev/shm's filesystem")
    name = f"{PREFIX}mounted"
    target = f"/dev/shm/{name}"
    open(target, "wb").close()
    try:
        if subprocess.run([mount, "--bind", str(source), target], capture_output=True).returncode:
            pytest.skip("this process may not mount")
        reader = ShmReader(PREFIX)
        try:
            with pytest.raises(InvalidInputError, match="not on /dev/shm's filesystem"):
                reader.read(SharedMemorySlot(name, 0, need, 2, width, height, 0, int(PixelFormat.BGR8)))
        finally:
            reader.close()
            subprocess.run(["umount", target], check=True)
    finally:
        os.unlink(target)
