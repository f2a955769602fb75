"""Frames in shared memory: read a client's ``SharedMemoryRef`` slot, never outside its segment.

A camera node on the same host writes each frame into a slot of a POSIX shared-memory segment
(``client.shm_ring.ShmRing``) and sends only the slot's reference over ``StreamDetect``. Off
unless the server is started with ``--shm-allow PREFIX`` (like Triton's registration of system
shared memory): only segments whose name starts with PREFIX are ever opened, and only for a
client on this host (loopback or a unix socket, ``local_peer``; the servicer checks it).

A slot (the wire contract, proto ``SharedMemoryRef``) is a 64-byte header then the pixels::

    0..8    magic b"PSHMSLT1"
    8..16   generation, uint64 LE: odd while the producer writes, the next even value after
    16..24  byte size of the pixels, uint64 LE
    24..64  reserved (zero)

Every reference is checked before a byte of pixels is read, and refused INVALID with the
reason otherwise (``InvalidInputError``):

- the name is a plain name (``[A-Za-z0-9._-]``, no ``/``, not ``.``/``..``) with the allowed
  prefix; the segment is opened read-only, without following a symlink, and must be a regular
  file on the shared-memory filesystem itself (``/dev/shm`` is world-writable; a file mounted
  over a name there, FUSE for one, is another filesystem);
- the frame's size fits the decode limits, its stride fits a row (+ at most 64 KiB padding), the
  padding of all its rows together is at most an eighth of its pixel bytes or 4 MiB, whichever
  is more (``slot_bytes``), and ``byte_size`` is exactly ``row_stride x rows``;
- ``offset`` is a multiple of 64 and header + pixels end inside the segment's current size;
- the segment has at least the frame's bytes in memory (``st_blocks``): a producer wrote its
  pixels, so only a sparse segment, whose holes read as zeros into a copy as big as a real
  frame's at no cost to whoever made it, is refused;
- the header's magic, generation (equal to the reference's, i.e. the slot was not overwritten
  since) and byte size match the reference;
- seqlock: the generation is read again after the pixels were copied out; if it changed, the
  producer overwrote the slot during the copy and the frame is refused.

A refusal never says what the segment holds (its size, the slot's generation or byte size): the
generation is what makes a reference name a frame, and a client that could read it back from a
refusal could have any frame of a ring read for it by the server, however the ring's mode keeps
the client out.

Pixels are copied out once with ``pread`` on a cached read-only descriptor, straight into the
``bytes`` the raw-pixel decoder reads (the one copy raw gRPC also makes after parsing). Not
``mmap``: a producer that shrinks its segment while a mapping is read would kill the whole
server with SIGBUS; ``pread`` past the end is a short read, refused INVALID. The servicer reads
inside a decode slot, so the server holds at most one copy per slot (a reference is ~100 bytes
of undecoded budget; the copy up to ~112 MB at the 8K pixel limit). Open segments are cached
(at most ``max_open``, least recently used closed first), re-opened when the name now refers to
a new segment (the producer restarted), and closed once their producer has unlinked them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import struct
import threading
from collections import OrderedDict
from urllib.parse import unquote

from perception.decode import MAX_ROW_PADDING, DecodeLimits, PixelFormat, check_size
from perception.errors import ConfigError, InvalidInputError
from perception.pipeline import RawPixels, SharedMemorySlot

SHM_DIR = "/dev/shm"
MAGIC = b"PSHMSLT1"
HEADER_SIZE = 64
HEADER = struct.Struct("<8sQQ")  # magic, generation, byte size
GENERATION = struct.Struct("<Q")
GENERATION_OFFSET = 8
SLOT_ALIGN = 64
MAX_NAME_LEN = 200  # below NAME_MAX (255)
_NAME = re.compile(r"[A-Za-z0-9._-]+")
# The only way pixels leave a segment (a name to wrap in tests that prove what is never read).
_pread = os.pread
_BYTES_PER_PIXEL = {PixelFormat.BGR8: 3, PixelFormat.RGB8: 3, PixelFormat.GRAY8: 1, PixelFormat.NV12: 1}
# Row padding a slot may hold across the whole frame: an eighth of its pixel bytes, or this much,
# whichever is more (``slot_bytes``).
MAX_FRAME_PADDING = 4 * 1024 * 1024


def local_peer(peer: str) -> bool:
    """Whether a gRPC peer (``context.peer()``: ``ipv4:127.0.0.1:port``, ``ipv6:%5B::1%5D:port``
    (a URI: gRPC escapes the brackets), ``unix:path``) is on this host: a unix socket or a
    loopback address. A connection to one of the host's other addresses is not taken for local:
    which addresses are the host's own changes (DHCP, VPNs), and a camera node on this host
    reaches the server on loopback."""
    scheme, _, address = peer.partition(":")
    if scheme in ("unix", "unix-abstract"):
        return True
    if scheme not in ("ipv4", "ipv6"):
        return False
    try:
        ip = ipaddress.ip_address(unquote(address).rpartition(":")[0].removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None  # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


def check_prefix(prefix: str) -> str:
    """The ``--shm-allow`` prefix, validated: a plain, non-empty segment-name prefix."""
    if not _NAME.fullmatch(prefix) or prefix.startswith(".") or len(prefix) > MAX_NAME_LEN:
        raise ConfigError(f"shm_allow must be a plain segment-name prefix ([A-Za-z0-9._-], not starting with "
                          f"'.', no '/'), got {prefix!r}")
    return prefix


def slot_bytes(width: int, height: int, pixel_format: int, row_stride: int = 0) -> tuple[int, int]:
    """(row stride, pixel bytes) of a frame in a slot; InvalidInputError for an impossible one.

    The server copies stride x rows bytes out of the slot, so the padding is bounded over the
    whole frame, not only per row: 64 KiB a row times the 12,288 rows of a 4050x8192 NV12 frame
    (inside the 8K pixel limit) made a ~100-byte reference to a sparse segment cost an 855 MB
    copy, where the frame's pixels are 50 MB. Cameras pad rows to an alignment (64 to 4096
    bytes): 1920x1080 NV12 at a 2048-byte pitch pads 6 %, a 640-pixel row aligned to 512 pads
    60 % of a frame of 0.5 MB, and 1080p BGR8 rows aligned to 4096 pad 2.6 MB; all of them are
    within an eighth of the pixels or 4 MiB."""
    try:
        fmt = PixelFormat(pixel_format)
    except ValueError:
        raise InvalidInputError(f"shared-memory frame: unknown pixel format {pixel_format}") from None
    if fmt == PixelFormat.UNSPECIFIED:
        raise InvalidInputError("shared-memory frame has no pixel format")
    row = width * _BYTES_PER_PIXEL[fmt]
    stride = row_stride or row
    if stride < row or stride > row + MAX_ROW_PADDING:
        raise InvalidInputError(f"shared-memory frame: row_stride {stride} must be in {row}..{row + MAX_ROW_PADDING}")
    if fmt == PixelFormat.NV12 and (width % 2 or height % 2):
        raise InvalidInputError(f"NV12 needs even width and height, got {width}x{height}")
    rows = height + height // 2 if fmt == PixelFormat.NV12 else height
    padding, allowed = (stride - row) * rows, max(row * rows // 8, MAX_FRAME_PADDING)
    if padding > allowed:
        raise InvalidInputError(
            f"shared-memory frame {width}x{height}: row_stride {stride} pads its {rows} rows of {row} bytes by "
            f"{padding} bytes in all; at most {allowed} (an eighth of the pixel bytes, or {MAX_FRAME_PADDING})")
    return stride, stride * rows


class _Segment:
    """An open read-only descriptor of one segment, closed when evicted and no read uses it."""

    def __init__(self, fd: int, inode: tuple[int, int]) -> None:
        self.fd = fd
        self.inode = inode
        self.users = 0
        self.evicted = False


class ShmReader:
    """Reads frames out of shared-memory slots for one server. Thread-safe."""

    def __init__(self, prefix: str, limits: DecodeLimits | None = None, max_open: int = 16,
                 directory: str = SHM_DIR) -> None:
        if max_open < 1:
            raise ValueError("max_open must be positive")
        self.prefix = check_prefix(prefix)
        self.limits = limits or DecodeLimits()
        self.max_open = max_open
        self.directory = directory
        self._device = os.stat(directory).st_dev  # the filesystem every segment must be on
        self._open: OrderedDict[str, _Segment] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def open_segments(self) -> int:
        with self._lock:
            return len(self._open)

    def check_name(self, name: str) -> None:
        if not name:
            raise InvalidInputError("shared-memory frame names no segment")
        if len(name) > MAX_NAME_LEN or not _NAME.fullmatch(name) or name in (".", ".."):
            raise InvalidInputError(f"shared-memory segment name {name[:64]!r} is not a plain name "
                                    "([A-Za-z0-9._-], no '/')")
        if not name.startswith(self.prefix):
            raise InvalidInputError(f"shared-memory segment {name!r} is outside the prefix {self.prefix!r} "
                                    "this server may map")

    def read(self, ref: SharedMemorySlot) -> RawPixels:
        """The slot's pixels, copied out; InvalidInputError (never a read outside the segment)."""
        self.check_name(ref.segment)
        check_size(ref.width, ref.height, self.limits)
        stride, need = slot_bytes(ref.width, ref.height, ref.pixel_format, ref.row_stride)
        if ref.byte_size != need:
            raise InvalidInputError(f"shared-memory frame {ref.width}x{ref.height} (stride {stride}) is {need} bytes, "
                                    f"byte_size says {ref.byte_size}")
        if ref.offset % SLOT_ALIGN:
            raise InvalidInputError(f"shared-memory slot offset {ref.offset} is not a multiple of {SLOT_ALIGN}")
        seg = self._acquire(ref.segment)
        try:
            return RawPixels(ref.width, ref.height, stride, ref.pixel_format, self._copy(seg.fd, ref))
        finally:
            self._release(seg)

    def _copy(self, fd: int, ref: SharedMemorySlot) -> bytes:
        st = os.fstat(fd)
        if ref.offset + HEADER_SIZE + ref.byte_size > st.st_size:
            raise InvalidInputError(f"shared-memory slot at offset {ref.offset} + {HEADER_SIZE}-byte header + "
                                    f"{ref.byte_size} bytes ends past the segment")
        # tmpfs counts the pages written (or swapped out) in st_blocks, never holes.
        if st.st_blocks * 512 < ref.byte_size:
            raise InvalidInputError("shared-memory segment is sparse: it holds fewer bytes than the frame, so no "
                                    "producer wrote the frame's pixels")
        head = _pread(fd, HEADER.size, ref.offset)
        if len(head) != HEADER.size:
            raise InvalidInputError("shared-memory segment shrank below the slot")
        magic, generation, byte_size = HEADER.unpack(head)
        if magic != MAGIC:
            raise InvalidInputError(f"no shared-memory slot at offset {ref.offset} (bad magic)")
        if generation != ref.generation:
            raise InvalidInputError(f"stale shared-memory slot: it does not hold generation {ref.generation} "
                                    "(overwritten since, or being written)")
        if generation % 2:
            raise InvalidInputError(f"shared-memory frame generation {generation} is odd (a slot being written)")
        if byte_size != ref.byte_size:
            raise InvalidInputError(f"shared-memory slot does not hold {ref.byte_size} bytes, the frame's byte_size")
        data = _pread(fd, ref.byte_size, ref.offset + HEADER_SIZE)
        if len(data) != ref.byte_size:
            raise InvalidInputError("shared-memory segment shrank while the slot was read")
        after = _pread(fd, GENERATION.size, ref.offset + GENERATION_OFFSET)
        if len(after) != GENERATION.size or GENERATION.unpack(after)[0] != generation:
            raise InvalidInputError("shared-memory slot was overwritten while it was read (the ring is too small "
                                    "for the frames in flight)")
        return data

    # -- the cache of open segments --------------------------------------------------------

    def _acquire(self, name: str) -> _Segment:
        path = os.path.join(self.directory, name)
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            self._forget(name)
            raise InvalidInputError(f"no shared-memory segment {name!r}") from None
        except OSError as exc:
            raise InvalidInputError(f"shared-memory segment {name!r} cannot be opened: {exc.strerror}") from None
        inode = (st.st_dev, st.st_ino)
        with self._lock:
            self._close_unlinked()
            seg = self._open.get(name)
            if seg is not None and seg.inode == inode:
                self._open.move_to_end(name)
                seg.users += 1
                return seg
        fresh = self._open_segment(name, path)
        with self._lock:
            old = self._open.pop(name, None)
            if old is not None:
                self._evict(old)
            self._open[name] = fresh
            fresh.users += 1
            while len(self._open) > self.max_open:
                _, lru = self._open.popitem(last=False)
                self._evict(lru)
        return fresh

    def _open_segment(self, name: str, path: str) -> _Segment:
        try:
            # O_NONBLOCK: a FIFO planted under the name must not block the open before it is refused.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise InvalidInputError(f"no shared-memory segment {name!r}") from None
        except OSError as exc:  # ELOOP: a symlink; EACCES: not readable by the server
            raise InvalidInputError(f"shared-memory segment {name!r} cannot be opened: {exc.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise InvalidInputError(f"shared-memory segment {name!r} is not a regular file")
        if st.st_dev != self._device:
            os.close(fd)
            raise InvalidInputError(f"shared-memory segment {name!r} is not on {self.directory}'s filesystem")
        return _Segment(fd, (st.st_dev, st.st_ino))

    def _close_unlinked(self) -> None:
        """With the lock held: close the segments their producers have unlinked. A camera node
        that restarts makes a ring of a new name and unlinks the old one, whose memory tmpfs frees
        only once the last descriptor of it is closed; left to the LRU, up to ``max_open`` dead
        rings stayed in memory. One fstat per open segment, at most ``max_open``."""
        for name in [name for name, seg in self._open.items() if os.fstat(seg.fd).st_nlink == 0]:
            self._evict(self._open.pop(name))

    def _release(self, seg: _Segment) -> None:
        with self._lock:
            seg.users -= 1
            if seg.evicted and seg.users == 0:
                os.close(seg.fd)

    def _evict(self, seg: _Segment) -> None:
        """With the lock held: close now, or when the last read using it ends."""
        seg.evicted = True
        if seg.users == 0:
            os.close(seg.fd)

    def _forget(self, name: str) -> None:
        with self._lock:
            seg = self._open.pop(name, None)
            if seg is not None:
                self._evict(seg)

    def close(self) -> None:
        with self._lock:
            while self._open:
                _, seg = self._open.popitem()
                self._evict(seg)
