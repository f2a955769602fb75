"""A constant-velocity Kalman filter on boxes, vectorised over tracks, stepped in seconds.

State (8,): centre x, centre y, width, height, then their rates; pixels and pixels per second.
Measurement (4,): centre x, centre y, width, height of a detected box. Width and height are
filtered independently (not aspect ratio and height, as in SORT and ByteTrack): a pedestrian
turning or a car seen from a turning vehicle changes aspect quickly, and noise proportional to
each side keeps the x and y uncertainties of a wide box and of a tall box apart.

Time, not frames: ``predict`` takes the elapsed time ``dt`` in seconds and the process noise
is a rate (variance per second, added in proportion to ``dt``), so a gap of dropped frames is
one step of the right length, and widens the uncertainty as much as its duration calls for.

Every function is pure: it takes (N, 8) means and (N, 3, 4) covariances (float64) and returns
new arrays; N may be 0.

Why (N, 3, 4) and not (N, 8, 8): the four coordinates never interact. F only couples a
coordinate with its own rate, H reads each coordinate alone, and the initial, process and
measurement noises are diagonal, so every covariance the filter makes is zero outside four 2x2
blocks (coordinate k, rate k). Row ``cov[:, 0]`` holds the four position variances, ``cov[:, 1]``
the position-rate covariances, ``cov[:, 2]`` the rate variances, and the filter is four scalar
filters run side by side: the numbers of the 8x8 matrix form to rounding (the operations come
in another order; a test checks every entry) without its batched matrix products and solve,
which were about a quarter of a tracker update at 50 detections under the profiler; the
blocks cost a third of that. ``full_covariance`` gives the 8x8 matrices. ``predict`` and
``update`` run the blocks' formulas as compiled loops (``perception.tracking.kernels``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from perception.errors import ConfigError
from perception.tracking import kernels

_MIN_SIDE_PX = kernels.MIN_SIDE_PX  # the smallest side, in pixels, that noise is scaled by

# Rows of the (N, 3, 4) covariance: per coordinate, its variance, its covariance with its own
# rate, and the rate's variance.
_PP, _PV, _VV = kernels.PP, kernels.PV, kernels.VV


@dataclass(frozen=True)
class KalmanNoise:
    """Standard deviations, each a fraction of the box side (width for x, height for y).

    measurement: of a detected box's centre and sides.
    initial_position / initial_velocity: of a new track (velocity per second).
    process_position / process_velocity: random-walk rates, per square-root second (velocity
    in per-second units).

    The defaults are ByteTrack's per-frame weights (1/20 for position, 1/160 for velocity; 2x
    and 10x those at initiation) converted to rates at the 30 fps they were set for; they are
    not tuned on this project's recordings.
    """

    measurement: float = 1 / 20
    initial_position: float = 2 / 20
    initial_velocity: float = 10 / 160 * 30
    process_position: float = math.sqrt(30) / 20
    process_velocity: float = 30 * math.sqrt(30) / 160

    def __post_init__(self) -> None:
        for name in ("measurement", "initial_position", "initial_velocity", "process_position", "process_velocity"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"KalmanNoise.{name} must be a positive finite number, got {value!r}")


class BoxKalmanFilter:
    """Constant-velocity Kalman filter over (cx, cy, w, h); see the module docstring."""

    def __init__(self, noise: KalmanNoise | None = None) -> None:
        self.noise = noise if noise is not None else KalmanNoise()

    def initiate(self, measurements: NDArray[np.floating]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """New tracks at (N, 4) measured cx, cy, w, h: zero velocity, size-scaled uncertainty."""
        z = np.asarray(measurements, dtype=np.float64).reshape(-1, 4)
        n = z.shape[0]
        mean = np.zeros((n, 8), np.float64)
        mean[:, :4] = z
        side2 = _sides(z) ** 2
        cov = np.zeros((n, 3, 4), np.float64)
        cov[:, _PP] = self.noise.initial_position**2 * side2
        cov[:, _VV] = self.noise.initial_velocity**2 * side2
        return mean, cov

    def predict(
        self, mean: NDArray[np.float64], cov: NDArray[np.float64], dt: float
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Means and covariances ``dt`` seconds later (``dt`` >= 0).

        x' = F x, P' = F P F^T + Q dt, with F = [[I, dt I], [0, I]] and Q diagonal, scaled by
        the squared sides of the boxes before the step; per coordinate, on its 2x2 block:
        pp' = pp + 2 dt pv + dt^2 vv + dt q_p, pv' = pv + dt vv, vv' = vv + dt q_v.
        """
        if not (math.isfinite(dt) and dt >= 0):
            raise ValueError(f"dt must be a finite number of seconds >= 0, got {dt!r}")
        return kernels.kalman_predict(kernels.kernel_array(mean, np.float64), kernels.kernel_array(cov, np.float64),
                                      float(dt), float(self.noise.process_position**2),
                                      float(self.noise.process_velocity**2))

    def update(
        self, mean: NDArray[np.float64], cov: NDArray[np.float64], measurements: NDArray[np.floating]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Means and covariances corrected by (N, 4) measured cx, cy, w, h (row i by row i).

        S = H P H^T + R, K = P H^T S^-1, x' = x + K (z - H x), P' = P - K S K^T, with R scaled
        by the predicted sides (a measurement's own size is what is uncertain); per coordinate
        S is the scalar pp + r and the gain is (pp, pv) / S.
        """
        z = kernels.kernel_array(np.asarray(measurements, dtype=np.float64).reshape(-1, 4), np.float64)
        if z.shape[0] != mean.shape[0]:
            raise ValueError(f"{z.shape[0]} measurements for {mean.shape[0]} tracks")
        return kernels.kalman_update(kernels.kernel_array(mean, np.float64), kernels.kernel_array(cov, np.float64), z,
                                     float(self.noise.measurement**2))


def full_covariance(cov: NDArray[np.float64]) -> NDArray[np.float64]:
    """The (N, 8, 8) covariance matrices of (N, 3, 4) per-coordinate blocks, for inspection."""
    n = cov.shape[0]
    full = np.zeros((n, 8, 8), np.float64)
    pos, vel = np.arange(4), np.arange(4, 8)
    full[:, pos, pos] = cov[:, _PP]
    full[:, pos, vel] = cov[:, _PV]
    full[:, vel, pos] = cov[:, _PV]
    full[:, vel, vel] = cov[:, _VV]
    return full


def _sides(cxcywh: NDArray[np.float64]) -> NDArray[np.float64]:
    """(N, 4) w, h, w, h of (N, 4) cx, cy, w, h: each coordinate's noise scale."""
    wh = np.maximum(np.abs(cxcywh[:, 2:4]), _MIN_SIDE_PX)
    return np.concatenate([wh, wh], axis=1)
