"""A ring of shared-memory frame slots: the producer side of the same-host frame path.

A camera node on the server's host writes each frame into the next slot of a POSIX
shared-memory segment and sends only the slot's reference (proto ``SharedMemoryRef``) over
``StreamDetect``; the server (started with ``--shm-allow PREFIX``, the segment's name starting
with PREFIX) copies the pixels out of the slot. No pixel crosses the socket.

Slot layout (the wire contract; ``server.shm`` checks it): a 64-byte header then the pixels::

    0..8    magic b"PSHMSLT1"
    8..16   generation, uint64 LE: odd while the producer writes, the next even value after
    16..24  byte size of the pixels, uint64 LE
    24..64  reserved (zero)

``write`` is a seqlock writer: generation -> odd, pixels, size, generation -> even, and the
reference carries the even value; a server that reads a slot overwritten since (or during its
copy) answers the frame INVALID, never with another frame's pixels. Slots are reused round
robin, so keep more slots than frames in flight (the stream's window + 1, at least).

    with ShmRing(slots=4, slot_bytes=1920 * 1080 * 3) as ring:
        slot = ring.write(bgr)  # (H, W, 3) uint8
        frame = SourceFrame("front", 0, time.time_ns(), shm=slot)  # client.convert.to_request sends it

Single producer: one ring per camera thread (``write`` is not thread-safe). Linux only.

Access: the segment is the camera node's file in ``/dev/shm``, mode 0600 (only its own user can
read it) unless ``mode`` says otherwise. For a server running as another user (the vehicle's
systemd unit runs as a dynamic user), give the ring ``mode=0o640`` and ``group=`` a group the
server is a member of (``SupplementaryGroups=`` in its unit); deploy/README.md, "Shared-memory
frames".
Group or others are never given write access: only the producer writes a slot.
"""

from __future__ import annotations

import contextlib
import grp
import os
import secrets
import struct
from multiprocessing import shared_memory

import numpy as np
from numpy.typing import NDArray

from perception.decode import PixelFormat
from perception.errors import ConfigError, InvalidInputError
from perception.pipeline import SharedMemorySlot

MAGIC = b"PSHMSLT1"
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sQQ")
_U64 = struct.Struct("<Q")
_GENERATION_OFFSET = 8
_SIZE_OFFSET = 16
_ALIGN = 4096  # slots start on page boundaries (the server needs multiples of 64)
DEFAULT_PREFIX = "perception-"
DEFAULT_MODE = 0o600


def check_mode(mode: int) -> int:
    """A segment mode: the owner reads and writes; group and others may read, never write or execute."""
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600 or mode & 0o133:
        raise ConfigError(f"a shared-memory ring's mode must give its owner rw and no one else write or execute "
                          f"(e.g. 0o600, 0o640), got {mode:#o}")
    return mode


def group_id(group: str | int) -> int:
    """The id of a group given by name or id (an int, or a string of digits: ``--shm-group 1001``)."""
    if isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"a shared-memory ring's group {group!r} does not exist") from None


class ShmRing:
    """``slots`` slots of ``slot_bytes`` pixel bytes each in one new segment, unlinked on close.

    ``mode`` (default 0600) and ``group`` (a name or gid; default the process's group) set who
    else may read the segment: 0o640 with a group the server is in lets a server running as
    another user read the frames."""

    def __init__(
        self, slots: int, slot_bytes: int, prefix: str = DEFAULT_PREFIX, name: str = "",
        mode: int = DEFAULT_MODE, group: str | int | None = None,
    ) -> None:
        if slots < 1 or slot_bytes < 1:
            raise ConfigError(f"a ring needs at least one slot of at least one byte, got {slots} x {slot_bytes}")
        check_mode(mode)
        gid = None if group is None else group_id(group)
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.slot_stride = -(-(HEADER_SIZE + slot_bytes) // _ALIGN) * _ALIGN
        # The name the server's --shm-allow prefix must cover; unique per process and ring.
        self.name = name or f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        self._shm = shared_memory.SharedMemory(name=self.name, create=True, size=slots * self.slot_stride)
        try:
            # On the descriptor the segment was created with (shm_open's 0600, less the umask):
            # the mode asked for exactly, before a frame is in it.
            fd: int = self._shm._fd  # type: ignore[attr-defined]  # CPython's SharedMemory keeps it
            if gid is not None:
                os.fchown(fd, -1, gid)  # a group this user is a member of (else PermissionError)
            os.fchmod(fd, mode)
        except OSError as exc:
            self._shm.close()
            self._shm.unlink()
            raise ConfigError(f"shared-memory ring {self.name}: cannot set group {group!r} / mode {mode:#o}: "
                              f"{exc.strerror}") from exc
        buf = self._shm.buf
        assert buf is not None  # a segment just created and mapped
        self._buf: memoryview = buf
        self._bytes = np.frombuffer(buf, np.uint8)
        for i in range(slots):
            _HEADER.pack_into(self._buf, i * self.slot_stride, MAGIC, 0, 0)
        self._next = 0
        self._writes = 0
        # A reference names a frame by its slot's generation, which the server checks before it
        # reads: a client that cannot read this ring must not guess it from the frame count
        # (numbered 2, 4, 6..., another local client read a camera's frame in 9 tries).
        self._first = secrets.randbits(62) * 2
        self._closed = False

    @property
    def segment_bytes(self) -> int:
        return self.slots * self.slot_stride

    def offset_of(self, slot: int) -> int:
        return slot * self.slot_stride

    def write(self, image: NDArray[np.uint8], pixel_format: PixelFormat = PixelFormat.BGR8) -> SharedMemorySlot:
        """Copy one frame into the next slot; its reference.

        image: (H, W, 3) for BGR8 / RGB8, (H, W) for GRAY8, (H * 3 / 2, W) for NV12; any strides
        (one copy, straight into the slot, tightly packed)."""
        if self._closed:
            raise InvalidInputError("the shared-memory ring is closed")
        if image.dtype != np.uint8:
            raise InvalidInputError(f"frames must be uint8, got {image.dtype}")
        fmt = PixelFormat(pixel_format)
        if fmt in (PixelFormat.BGR8, PixelFormat.RGB8):
            if image.ndim != 3 or image.shape[2] != 3:
                raise InvalidInputError(f"a {fmt.name} frame is (H, W, 3), got {image.shape}")
            height, width = image.shape[:2]
        elif fmt == PixelFormat.GRAY8 and image.ndim == 2:
            height, width = image.shape
        elif fmt == PixelFormat.NV12 and image.ndim == 2 and image.shape[0] % 3 == 0:
            height, width = image.shape[0] * 2 // 3, image.shape[1]
        else:
            raise InvalidInputError(f"cannot write a {fmt.name} frame of shape {image.shape}")
        size = int(image.nbytes)
        if size > self.slot_bytes:
            raise InvalidInputError(f"a frame of {size} bytes does not fit a slot of {self.slot_bytes}")
        slot = self._next
        self._next = (slot + 1) % self.slots
        offset = self.offset_of(slot)
        base = self._first + self._writes * 2
        self._writes += 1
        _U64.pack_into(self._buf, offset + _GENERATION_OFFSET, base + 1)  # odd: being written
        start = offset + HEADER_SIZE
        np.copyto(self._bytes[start:start + size].reshape(image.shape), image)
        _U64.pack_into(self._buf, offset + _SIZE_OFFSET, size)
        _U64.pack_into(self._buf, offset + _GENERATION_OFFSET, base + 2)  # even: complete
        return SharedMemorySlot(self.name, offset, size, base + 2, width, height, 0, int(fmt))

    def close(self) -> None:
        """Unlink the segment (a server holding it open keeps reading the old one until it re-checks
        the name) and unmap it."""
        if self._closed:
            return
        self._closed = True
        del self._bytes, self._buf  # the segment refuses to unmap while views of it exist
        with contextlib.suppress(FileNotFoundError):  # already unlinked (by hand, or a test)
            self._shm.unlink()
        self._shm.close()

    def __enter__(self) -> ShmRing:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
