"""A frame's answer: a frame whose outputs cannot be post-processed is answered, not lost, and
tracking is keyed by the client's host and camera."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from perception.errors import ModelError
from perception.manifest import load_manifest
from perception.pipeline import FrameInput, FramePipeline, RequestOptions
from perception.tracking import TrackerPool
from perception.types import FrameStatus
from server.answer import FrameTask, finish_task, track_answer
from server.metrics_protocol import NULL_METRICS
from server.scheduler import JobResult, JobStatus
from tests.server.conftest import jpeg


def _inferred(pipe: FramePipeline, outputs: dict[str, np.ndarray], camera: str = "front", seq: int = 0) -> FrameTask:
    task = FrameTask(camera, seq, 1_000_000_000 + seq * 100_000_000, track=True)
    task.prepared = pipe.prepare(FrameInput(camera, seq, task.capture_timestamp_ns, encoded=jpeg()), RequestOptions())
    task.complete(JobResult(JobStatus.OK, outputs, batch_size=1))
    return task


def test_a_frame_whose_outputs_cannot_be_decoded_is_answered_on_a_stream_and_raises_on_a_call(
        tiny_manifest: Path) -> None:
    pipe = FramePipeline.from_manifest(load_manifest(tiny_manifest))
    bogus = {"nothing_the_layout_reads": np.zeros((3,), np.float32)}
    answer = finish_task(_inferred(pipe, bogus), pipe, NULL_METRICS, answer_errors=True)
    assert answer.status is FrameStatus.OVERLOADED and "post-processing failed (error id " in answer.message
    assert len(answer.detections) == 0
    with pytest.raises(ModelError, match="post-processing failed"):
        finish_task(_inferred(pipe, bogus), pipe, NULL_METRICS)


def test_tracks_are_kept_per_client_host_and_camera(tiny_manifest: Path) -> None:
    """Two vehicles that both call a camera "front" must not share (and keep resetting) one
    tracker: their clocks differ, so each one's frames looked like the other's time going back."""
    from perception.types import Detections, StageTimings
    from server.answer import FrameAnswer

    pool = TrackerPool()
    box = Detections(np.array([[10, 10, 50, 90]], np.float32), np.array([0.9], np.float32), np.array([0], np.int64))

    def frame(owner: str, seq: int, ts: int) -> FrameAnswer:
        task = FrameTask("front", seq, ts, track=True, owner=owner)
        answer = FrameAnswer("front", seq, ts, FrameStatus.OK, "", box, 100, 100, StageTimings(), class_names=("car",))
        return track_answer(answer, task, pool)

    results = []
    for k in range(3):  # vehicle a's clock is 5 s ahead of vehicle b's
        results.append(frame("10.0.0.1", k, 5_000_000_000 + k * 100_000_000))
        results.append(frame("10.0.0.2", k, k * 100_000_000 + 1))
    assert not any(r.tracks.restarted for r in results)
    a_ids = {int(r.tracks.track_ids[0]) for r in results[0::2]}
    b_ids = {int(r.tracks.track_ids[0]) for r in results[1::2]}
    assert len(a_ids) == len(b_ids) == 1 and a_ids != b_ids


def test_a_served_camera_that_halves_its_resolution_keeps_its_track_ids() -> None:
    """The answer's frame size reaches the tracker: a camera going from 1280x720 to 640x360
    keeps its ids (perception.tracking.pool, ``frame_size``)."""
    from perception.types import Detections, StageTimings
    from server.answer import FrameAnswer

    pool = TrackerPool()

    def frame(seq: int, width: int, height: int) -> FrameAnswer:
        s = width / 1280
        x = 100 + 10 * seq  # moving right, in 1280x720 pixels
        box = Detections(np.array([[x * s, 200 * s, (x + 80) * s, 260 * s]], np.float32), np.array([0.9], np.float32),
                         np.array([0], np.int64))
        task = FrameTask("front", seq, 1_000_000_000 + seq * 33_333_333, track=True, owner="10.0.0.1")
        answer = FrameAnswer("front", seq, task.capture_timestamp_ns, FrameStatus.OK, "", box, width, height,
                             StageTimings(), class_names=("car",))
        return track_answer(answer, task, pool)

    ids = [int(frame(k, 1280, 720).tracks.track_ids[0]) for k in range(5)]
    ids += [int(frame(k, 640, 360).tracks.track_ids[0]) for k in range(5, 10)]
    assert len(set(ids)) == 1 and ids[0] > 0
