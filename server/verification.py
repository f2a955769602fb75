"""Verification of a model before it is swapped in: it must still detect, on the frames its
artifact ships, what its build recorded for them, and run within bounds of the served model's
latency on this device (both measured here, side by side)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from perception.errors import ModelError
from perception.parity import parity
from perception.pipeline import RequestOptions, file_frame
from perception.types import Detections
from server.served_model import ServedModel, recorded_latency_ratio

log = logging.getLogger(__name__)


def verify_before_swap(new: ServedModel, current: ServedModel, max_changed: float, max_latency_ratio: float,
                       latency_slack_ms: float) -> None:
    """ModelError unless ``new`` detects on its shipped frames what its build recorded (at most
    ``max_changed`` of the detections vanished or appeared) and its latency there is within
    ``max_latency_ratio`` (times the ratio its build recorded, and ``latency_slack_ms``) of the
    served model ``current``'s, measured here side by side."""
    ver = new.manifest.verification
    if ver is None or not ver.frames:
        log.warning("%s ships no verification frames: checked for latency only", new.describe())
        frames: list[tuple[Path, str] | None] = [None]
    else:
        # Read and hashed again here, not only when the manifest loaded: the engine's load came
        # in between, and the frames must be those the recorded detections were made on.
        frames = [(new.manifest.path_of(f.file), f.sha256) for f in ver.frames]
    got, new_s = _run(new, frames)
    if ver is not None and ver.frames:
        expected = _expected(new)
        if expected is None:  # it used to be served on latency alone without a word
            log.warning("%s ships verification frames but no detections recorded for %s or its parent: checked "
                        "for latency only", new.describe(), new.variant.name)
        else:
            par = parity(expected, got)
            worst = max(par["vanished"], par["appeared"])
            if worst > max_changed:
                raise ModelError(f"fails its verification frames: {par['vanished']:.0%} of the recorded detections "
                                 f"vanished, {par['appeared']:.0%} appeared (limit {max_changed:.0%})")
    try:
        _, cur_s = _run(current, frames)
    except Exception as exc:  # the served model failing here is no reason to refuse its replacement
        log.warning("the served model %s fails on the verification frames (%s: %s): the latency of %s is not "
                    "compared", current.describe(), type(exc).__name__, exc, new.describe())
        cur_s = 0.0
    recorded = recorded_latency_ratio(new, current)
    limit = max_latency_ratio * max(1.0, recorded)
    if cur_s > 0 and new_s / cur_s > limit and new_s - cur_s > latency_slack_ms / 1e3:
        raise ModelError(f"too slow here: {1e3 * new_s:.2f} ms per frame vs {1e3 * cur_s:.2f} ms for the served "
                         f"model ({new_s / cur_s:.2f}x; limit {limit:.2f}x)")

def _expected(m: ServedModel) -> list[Detections] | None:
    """The detections ``m``'s build recorded on its verification frames (None: none for its
    variant or its parent)."""
    ver = m.manifest.verification
    if ver is None:
        return None
    name = m.variant.name if m.variant.name in ver.expected else m.variant.parent
    rows = ver.expected.get(name)
    if rows is None:
        return None
    out = []
    for frame in rows:
        a = np.asarray(frame, np.float32).reshape(-1, 6)
        # Builds before boxes wholly in the letterbox padding were dropped recorded them, with
        # no size: the server answers none, and they are no detection to miss.
        a = a[(a[:, 2] > a[:, 0]) & (a[:, 3] > a[:, 1])]
        out.append(Detections(a[:, :4].copy(), a[:, 4].copy(), a[:, 5].astype(np.int64)))
    return out


def _run(m: ServedModel, frames: Sequence[tuple[Path, str] | None]) -> tuple[list[Detections], float]:
    """Detections of each frame (deployed threshold) and the least-disturbed batch-1 inference time."""
    dets: list[Detections] = []
    times: list[float] = []
    for i, f in enumerate(frames):
        if f is None:
            x = np.zeros((1, 3, m.pipeline.spec.input_height, m.pipeline.spec.input_width), np.float32)
            prepared = None
        else:
            prepared = m.pipeline.prepare(file_frame(f[0], i, "verify", sha256=f[1]), RequestOptions())
            x = m.pipeline.to_batch([prepared.tensor])
        for _ in range(5):
            t0 = time.perf_counter()
            out = m.infer(x)
            times.append(time.perf_counter() - t0)
        m.pipeline.check_finite(out)  # a model that computes only NaN is no candidate either
        if prepared is not None:
            dets.append(m.pipeline.finish({n: a[0] for n, a in out.items()}, prepared))
    return dets, float(np.min(times))
