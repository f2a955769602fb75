"""A constant-velocity Kalman filter on boxes, vectorised over tracks, stepped in seconds.

State (8,): centre x, centre y, width, height, then their rates; pixels and pixels per second.
Measurement (4,): centre x, centre y, width, height of a detected box. Width and height are
filtered independently (not aspect ratio and height, as in SORT and ByteTrack): a pedestrian
turning or a car seen from a turning vehicle changes aspect quickly, and noise proportional to
each side keeps the x and y uncertainties of a wide box and of a tall box apart.

Time, not frames: ``predict`` takes the elapsed time ``dt`` in seconds and the process noise
is a rate (variance per second, added in proportion to ``dt``), so a gap of dropped frames is
one step of the right length, and widens the uncertainty as much as its duration calls for.

Every function is pure: it takes (N, 8) means and (N, 8, 8) covariances (float64) and returns
new arrays; N may be 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from perception.errors import ConfigError

# The smallest side, in pixels, that noise is scaled by: a degenerate (zero-width) box must not
# make a covariance singular.
_MIN_SIDE_PX = 1.0


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
        side = _sides(z)
        std = np.concatenate([self.noise.initial_position * side, self.noise.initial_velocity * side], axis=1)
        cov = np.zeros((n, 8, 8), np.float64)
        idx = np.arange(8)
        cov[:, idx, idx] = std**2
        return mean, cov

    def predict(
        self, mean: NDArray[np.float64], cov: NDArray[np.float64], dt: float
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Means and covariances ``dt`` seconds later (``dt`` >= 0).

        x' = F x, P' = F P F^T + Q dt, with F = [[I, dt I], [0, I]] and Q diagonal, scaled by
        the squared sides of the boxes before the step.
        """
        if not (math.isfinite(dt) and dt >= 0):
            raise ValueError(f"dt must be a finite number of seconds >= 0, got {dt!r}")
        new_mean = mean.copy()
        new_mean[:, :4] += dt * mean[:, 4:]
        # F P F^T by blocks (P = [[A, B], [B^T, C]]): a quarter of the work of two 8x8 products.
        a, b, c = cov[:, :4, :4], cov[:, :4, 4:], cov[:, 4:, 4:]
        bt = cov[:, 4:, :4]
        new_cov = np.empty_like(cov)
        new_cov[:, :4, :4] = a + dt * (b + bt) + dt * dt * c
        new_cov[:, :4, 4:] = b + dt * c
        new_cov[:, 4:, :4] = bt + dt * c
        new_cov[:, 4:, 4:] = c
        side = _sides(mean[:, :4])
        q = np.concatenate(
            [(self.noise.process_position * side) ** 2, (self.noise.process_velocity * side) ** 2], axis=1
        )
        idx = np.arange(8)
        new_cov[:, idx, idx] += dt * q
        return new_mean, new_cov

    def update(
        self, mean: NDArray[np.float64], cov: NDArray[np.float64], measurements: NDArray[np.floating]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Means and covariances corrected by (N, 4) measured cx, cy, w, h (row i by row i).

        S = H P H^T + R, K = P H^T S^-1, x' = x + K (z - H x), P' = P - K S K^T; R is scaled by
        the predicted sides (a measurement's own size is what is uncertain).
        """
        z = np.asarray(measurements, dtype=np.float64).reshape(-1, 4)
        if z.shape[0] != mean.shape[0]:
            raise ValueError(f"{z.shape[0]} measurements for {mean.shape[0]} tracks")
        if z.shape[0] == 0:
            return mean.copy(), cov.copy()
        r = (self.noise.measurement * _sides(mean[:, :4])) ** 2
        s = cov[:, :4, :4].copy()
        idx = np.arange(4)
        s[:, idx, idx] += r
        hp = cov[:, :4, :]  # H P, (N, 4, 8)
        gain = np.linalg.solve(s, hp).transpose(0, 2, 1)  # K = P H^T S^-1 (S symmetric), (N, 8, 4)
        innovation = z - mean[:, :4]
        new_mean = mean + np.einsum("nij,nj->ni", gain, innovation)
        new_cov = cov - gain @ s @ gain.transpose(0, 2, 1)
        return new_mean, new_cov


def _sides(cxcywh: NDArray[np.float64]) -> NDArray[np.float64]:
    """(N, 4) w, h, w, h of (N, 4) cx, cy, w, h: each coordinate's noise scale."""
    wh = np.maximum(np.abs(cxcywh[:, 2:4]), _MIN_SIDE_PX)
    return np.concatenate([wh, wh], axis=1)
