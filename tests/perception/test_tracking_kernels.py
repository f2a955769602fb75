"""The tracker's compiled loops (perception.tracking.kernels): the same numbers as the NumPy
forms, compiled once, and a working fallback where numba has nowhere to cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from perception.boxes import box_iou
from perception.tracking import BoxKalmanFilter, KalmanNoise, Tracker, TrackerConfig, TrackerPool, kernels
from perception.types import Detections

ROOT = Path(__file__).resolve().parents[2]


def _boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 400, (n, 2))
    wh = rng.uniform(0, 80, (n, 2))
    wh[::7] = 0  # degenerate boxes: zero area
    b = np.concatenate([xy, xy + wh], axis=1)
    b[::11, 2] = b[::11, 0] - 3  # inverted: negative width
    return b


@pytest.mark.parametrize("seed", range(5))
def test_pairwise_iou_is_box_iou_to_the_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = _boxes(rng, 40), _boxes(rng, 33)
    b[:10] = a[:10] + rng.normal(0, 2, (10, 4))  # overlaps at every IoU
    got = kernels.pairwise_iou(a.astype(np.float32), b.astype(np.float32))
    assert got.dtype == np.float32
    assert np.array_equal(got, box_iou(a, b))
    assert kernels.pairwise_iou(np.zeros((0, 4), np.float32), b.astype(np.float32)).shape == (0, 33)


def test_match_allowed_solves_conflicts_and_passes_disjoint_pairs_through() -> None:
    rows = np.array([0, 1, 2], np.int64)
    cols = np.array([4, 0, 2], np.int64)
    t, d = kernels.match_allowed(rows, cols, np.array([0.5, 0.6, 0.7]), 0.3)
    assert t.tolist() == [0, 1, 2] and d.tolist() == [4, 0, 2]
    # Row 0 has two pairs and column 1 two: one confident pair beats two marginal ones.
    rows = np.array([0, 0, 1], np.int64)
    cols = np.array([0, 1, 1], np.int64)
    t, d = kernels.match_allowed(rows, cols, np.array([0.31, 0.9, 0.31]), 0.3)
    assert t.tolist() == [0] and d.tolist() == [1]
    t, d = kernels.match_allowed(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), 0.3)
    assert t.size == 0 and d.size == 0


def test_a_pool_compiles_the_loops_when_made_and_odd_arrays_compile_nothing_more() -> None:
    """A server's first tracked frame must not wait for a compile: the pool warms the kernels
    when made, and detections in other layouts or dtypes (strided views, float32 boxes and
    scores) reach them as the one compiled signature."""
    TrackerPool(TrackerConfig())
    compiled = {name: len(getattr(kernels, name).signatures)
                for name in ("associate", "kalman_predict", "kalman_update")}  # those called from Python
    assert all(n >= 1 for n in compiled.values()), compiled
    # Ints where floats are meant: accepted by the settings, and still floats to the kernels.
    noise = KalmanNoise(measurement=1, initial_position=1, initial_velocity=1, process_position=1, process_velocity=1)
    tracker = Tracker(TrackerConfig(match_iou=1, low_match_iou=1, high_score=1), BoxKalmanFilter(noise))
    # Read-only float64 boxes (the type says float32; float64 is what a replayed file may hold).
    frozen: Any = np.array([[10, 10, 50, 50], [12, 10, 52, 50]], np.float64)
    frozen.flags.writeable = False
    frozen_classes = np.zeros((2,), np.int64)
    frozen_classes.flags.writeable = False
    for k in range(3):
        tracker.update(Detections(frozen, np.ones((2,), np.float32), frozen_classes), 1_000_000_000 + k * 33_000_000)
    tracker = Tracker(TrackerConfig())
    big = np.zeros((6, 8), np.float32)
    big[:, :4] = [[10, 10, 50, 50], [100, 100, 160, 150], [200, 20, 240, 90], [0, 0, 1, 1], [5, 5, 9, 9],
                  [300, 300, 340, 360]]
    classes = np.zeros((12,), np.int64)
    classes[::2] = [0, 1, 0, 1, 0, 1]
    for k in range(5):
        big[:, :4] += 3
        # Views with a stride: 8 numbers a box, every other class.
        tracker.update(Detections(big[:, :4], np.linspace(0.3, 0.9, 6, dtype=np.float32), classes[::2]),
                       1_000_000_000 + k * 33_000_000)
    assert len(tracker) > 0
    assert {name: len(getattr(kernels, name).signatures) for name in compiled} == compiled


def test_where_numba_cannot_cache_the_loops_are_compiled_anyway(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only install with no NUMBA_CACHE_DIR: numba finds no cache locator and refuses
    ``cache=True``; the kernel is compiled without a cache instead of failing the import."""
    import numba.core.caching as caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    with pytest.raises(RuntimeError, match="no locator"):
        import numba

        numba.njit(cache=True)(lambda x: x + 1)

    def double(x: float) -> float:
        return 2 * x

    monkeypatch.setattr(kernels, "_KERNELS", [])  # not one of the tracker's, for warm()
    compiled = kernels._compiled(double)
    assert compiled(2.5) == 5.0
    assert compiled._cache.__class__.__name__ == "NullCache"


def test_a_cache_numba_cannot_read_is_compiled_past(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
                                                     ) -> None:
    """A cache whose index a power cut emptied makes numba raise on load (EOFError); the server
    must still start: ``warm`` compiles the kernels again without the cache, and says why."""
    import numba
    import numba.core.caching as caching

    def broken(*args: object) -> None:
        raise EOFError("Ran out of input")

    for name in kernels._KERNELS:  # fresh dispatchers, that will look in the cache
        monkeypatch.setattr(kernels, name, numba.njit(cache=True)(getattr(kernels, name).py_func))
    monkeypatch.setattr(caching.Cache, "load_overload", broken)
    monkeypatch.setattr(kernels, "_warmed", False)
    kernels.warm()
    assert "could not use numba's cache (EOFError: Ran out of input)" in caplog.text
    assert all(isinstance(getattr(kernels, name)._cache, caching.NullCache) for name in kernels._KERNELS)
    assert kernels.associate.signatures
    iou = kernels.pairwise_iou(np.array([[0, 0, 2, 2]], np.float32), np.array([[1, 0, 3, 2]], np.float32))
    assert iou[0, 0] == np.float32(1 / 3)


def test_code_that_only_reads_tracks_does_not_load_numba() -> None:
    """A camera node converts answers with TrackState but runs no tracker: numba (about 115 MB)
    stays out of its process."""
    code = ("import sys; import client.frames, client.convert, client.camera_node; "
            "from perception.tracking import TrackState, TrackerConfig; "
            "assert 'numba' not in sys.modules, 'numba loaded'; "
            "from perception.tracking import Tracker; assert 'numba' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
