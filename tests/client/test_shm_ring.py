"""client.shm_ring: who may read a ring's segment (its mode and group)."""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

from client.shm_ring import MAGIC, ShmRing
from perception.errors import ConfigError

PREFIX = "perception-test-ring-"


def _segment(ring: ShmRing) -> os.stat_result:
    return os.stat(f"/dev/shm/{ring.name}")


def _leftovers() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(PREFIX)]


def test_default_is_owner_only() -> None:
    with ShmRing(2, 64, prefix=PREFIX) as ring:
        assert stat.S_IMODE(_segment(ring).st_mode) == 0o600


def test_mode_and_group_are_set_whatever_the_umask() -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    old = os.umask(0o077)  # shm_open's mode is masked by the umask; the ring's is not
    try:
        with ShmRing(2, 64, prefix=PREFIX, mode=0o640, group=group) as ring:
            st = _segment(ring)
            assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == os.getgid()
            ring.write(np.zeros((4, 4, 3), np.uint8))
        with ShmRing(2, 64, prefix=PREFIX, mode=0o644, group=os.getgid()) as ring:
            assert stat.S_IMODE(_segment(ring).st_mode) == 0o644
    finally:
        os.umask(old)


@pytest.mark.parametrize("mode", [0o660, 0o666, 0o700, 0o400, 0o4600, -1])
def test_modes_granting_write_or_exec_are_refused(mode: int) -> None:
    with pytest.raises(ConfigError, match="mode"):
        ShmRing(2, 64, prefix=PREFIX, mode=mode)
    assert not _leftovers()


def test_an_unknown_group_is_refused_and_leaves_no_segment() -> None:
    with pytest.raises(ConfigError, match="no-such-group-here"):
        ShmRing(2, 64, prefix=PREFIX, mode=0o640, group="no-such-group-here")
    assert not _leftovers()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("head") is None, reason="needs root to act as another user")
def test_another_user_in_the_group_reads_the_frames(tmp_path: Path) -> None:
    """What the vehicle's server (a dynamic user with the ring's group as a supplementary group)
    sees: 0640 + group lets it read the slot; the default 0600 does not."""
    reader_gid = 54321  # root may hand a segment to any group

    def read_as_server(ring: ShmRing) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["head", "-c", "8", f"/dev/shm/{ring.name}"], capture_output=True, timeout=30,
                              user=65534, group=65534, extra_groups=[reader_gid], cwd=tmp_path)

    with ShmRing(2, 64, prefix=PREFIX, mode=0o640, group=reader_gid) as ring:
        ok = read_as_server(ring)
        assert ok.returncode == 0 and ok.stdout == MAGIC, ok.stderr
    with ShmRing(2, 64, prefix=PREFIX) as ring:
        refused = read_as_server(ring)
        assert refused.returncode != 0 and b"denied" in refused.stderr


def test_generations_cannot_be_guessed_from_the_frame_count() -> None:
    """A reference names a frame by its slot's generation; counted from 2 (2, 4, 6...), another
    local client read a camera's frame through the server in a few tries."""
    frame = np.zeros((2, 4, 3), np.uint8)
    firsts = []
    for _ in range(3):
        with ShmRing(2, 64, prefix=PREFIX) as ring:
            a, b = ring.write(frame), ring.write(frame)
            assert b.generation == a.generation + 2 and a.generation % 2 == 0  # even: complete
            firsts.append(a.generation)
    assert len(set(firsts)) == 3 and min(firsts) > 1 << 20
