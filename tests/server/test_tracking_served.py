"""Track ids over gRPC: asked for per request, kept per camera across frames and across a
reconnect, absent when not asked for."""

from __future__ import annotations

import queue
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from perception.v1 import detector_pb2 as pb
from tests.server.conftest import jpeg, request


def _tracked(camera: str, seq: int, track: bool = True, resent: bool | None = False) -> pb.DetectRequest:
    """A frame of the same scene every time (the same objects), marked re-sent or not as the
    client library marks every frame (None: unmarked, as a client older than the field sends)."""
    req = request(camera, seq, jpeg(seed=3))
    req.frame.capture_timestamp_ns = 1_000_000_000 + seq * 33_000_000
    req.options.track = track
    req.options.score_threshold = 0.3
    if resent is not None:
        req.frame.resent = resent
    return req


def _lockstep(run: Any, reqs: list[pb.DetectRequest]) -> list[pb.DetectResponse]:
    """Send each frame only after the previous one's answer: none is replaced as stale."""
    answered: queue.Queue[pb.DetectResponse] = queue.Queue()

    def gen() -> Iterator[pb.DetectRequest]:
        for r in reqs:
            yield r
            answered.get(timeout=30)

    out = []
    for a in run.stub.StreamDetect(gen(), timeout=60):
        out.append(a)
        answered.put(a)
    return out


def test_track_ids_persist_across_frames_and_reconnects(serve: Any) -> None:
    run = serve()
    first = _lockstep(run, [_tracked("front", i) for i in range(4)])
    assert all(a.status == pb.FRAME_STATUS_OK for a in first) and len(first[0].detections) > 0
    ids = [sorted(d.track_id for d in a.detections) for a in first]
    assert all(i > 0 for i in ids[0]) and ids[1] == ids[2] == ids[3] == ids[0]
    assert {d.track_state for d in first[0].detections} == {pb.TRACK_STATE_NEW}
    assert {d.track_state for d in first[3].detections} == {pb.TRACK_STATE_CONFIRMED}
    # A new stream of the same camera (a reconnect) finds its tracks.
    again = _lockstep(run, [_tracked("front", 4)])
    assert sorted(d.track_id for d in again[0].detections) == ids[0]
    # Another camera has its own tracker (ids are unique within a camera): all new there.
    other = run.stub.Detect(_tracked("rear", 0), timeout=10)
    assert other.detections and {d.track_state for d in other.detections} == {pb.TRACK_STATE_NEW}
    # A request without track gets none.
    plain = run.stub.Detect(_tracked("front", 5, track=False), timeout=10)
    assert plain.detections and {d.track_id for d in plain.detections} == {0}


def test_a_reconnect_that_resends_tracked_frames_keeps_the_tracks(serve: Any) -> None:
    """The client library re-sends, on a new stream, the frames it had no answer for. Frames the
    server had tracked came back with a sequence that went back, and every track of the camera
    was dropped as if the camera had restarted."""
    run = serve()
    first = _lockstep(run, [_tracked("front", i) for i in range(4)])
    ids = [sorted(d.track_id for d in a.detections) for a in first]
    reqs = [_tracked("front", i, resent=i < 4) for i in (2, 3, 4, 5)]  # 2 and 3 again, as the library marks them
    again = _lockstep(run, reqs)
    assert [sorted(d.track_id for d in a.detections) for a in again] == [ids[0]] * 4
    assert {d.track_state for d in again[3].detections} == {pb.TRACK_STATE_CONFIRMED}
    # A client older than the mark re-sends unmarked: the server's guess (same sequence, time
    # and detections) keeps its tracks, as before the mark existed.
    legacy = _lockstep(run, [_tracked("front", i, resent=None) for i in (4, 5, 6)])
    assert [sorted(d.track_id for d in a.detections) for a in legacy] == [ids[0]] * 3


def test_a_recording_replayed_again_is_tracked_anew(serve: Any) -> None:
    """The same recording replayed twice within the tracker's time-to-live numbers, stamps and
    detects its frames exactly as the first time: every frame of the second replay passed for
    a re-sent one and came back with the first replay's track ids, from memory, the tracker
    never stepped. Frames not marked re-sent are new frames: a sequence going back restarts
    the camera's tracks."""
    run = serve()
    first = _lockstep(run, [_tracked("front", i) for i in range(3)])
    second = _lockstep(run, [_tracked("front", i) for i in range(3)])
    old = {d.track_id for a in first for d in a.detections}
    new = {d.track_id for a in second for d in a.detections}
    assert old and new and not old & new
    assert {d.track_state for d in second[0].detections} == {pb.TRACK_STATE_NEW}


def test_a_resent_frame_the_tracker_moved_past_does_not_restart_it(serve: Any) -> None:
    """A frame answered stale (never tracked) and re-sent after a reconnect came back with a
    sequence that went back and no first answer to repeat: every track of the camera was
    dropped as if it had restarted. It is answered without tracks now."""
    run = serve()
    first = _lockstep(run, [_tracked("front", i) for i in (0, 1, 3)])  # 2 never reached the tracker
    ids = sorted(d.track_id for d in first[-1].detections)
    again = _lockstep(run, [_tracked("front", 2, resent=True), _tracked("front", 4)])
    assert again[0].detections and {d.track_id for d in again[0].detections} == {0}
    assert sorted(d.track_id for d in again[1].detections) == ids  # the tracks go on


def test_a_recording_whose_first_frame_is_at_time_zero_keeps_its_ids(serve: Any) -> None:
    """A video or image folder stamps its first frame 0, which the wire reads as "no capture
    time": tracked on the arrival clock, the next frame (100 ms) looked like time going back."""
    run = serve()
    reqs = [_tracked("rear", i) for i in range(3)]
    for i, r in enumerate(reqs):
        r.frame.capture_timestamp_ns = i * 100_000_000
    answers = _lockstep(run, reqs)
    ids = [sorted(d.track_id for d in a.detections) for a in answers]
    assert ids[0] and ids[0] == ids[1] == ids[2]


def test_the_tracker_is_loaded_when_a_frame_first_asks_for_tracks(serve: Any) -> None:
    """A server nobody asks for tracks does without the tracker's compiled loops (numba, about
    150 MB: 32 streams of big frames went over the soak bench's 600 MB with them); the first
    tracked frame loads them and is answered with track ids."""
    run = serve()
    assert run.server.trackers is not None and not run.server.trackers.loaded
    plain = run.stub.Detect(_tracked("front", 0, track=False), timeout=10)
    assert plain.detections and not run.server.trackers.loaded
    tracked = run.stub.Detect(_tracked("front", 1), timeout=60)
    assert tracked.detections and all(d.track_id > 0 for d in tracked.detections)
    assert run.server.trackers.loaded


def test_preload_tracker_loads_it_at_start(serve: Any) -> None:
    run = serve(preload_tracker=True)
    assert run.server.trackers is not None and run.server.trackers.loaded


def test_a_tracker_that_cannot_be_loaded_ends_no_stream(serve: Any, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """numba missing (or its compile failing): a preloading server starts all the same, and the
    frames that ask for tracks are answered with their detections, untracked, saying why; the
    stream goes on, and the load is not tried again on every frame."""
    monkeypatch.setitem(sys.modules, "perception.tracking.pool", None)  # its import raises ImportError
    run = serve(preload_tracker=True)
    assert run.server.trackers is not None and not run.server.trackers.loaded
    answers = _lockstep(run, [_tracked("front", i) for i in range(3)])
    assert [a.status for a in answers] == [pb.FRAME_STATUS_OK] * 3
    assert all(a.detections and {d.track_id for d in a.detections} == {0} for a in answers)
    why = "not tracked: the tracker could not be loaded (ModuleNotFoundError"
    assert all(a.message.startswith(why) for a in answers)
    assert caplog.text.count("the tracker could not be loaded") == 1  # the start's try; frames wait out RETRY_S
    unary = run.stub.Detect(_tracked("rear", 0), timeout=10)
    assert unary.status == pb.FRAME_STATUS_OK and "not tracked" in unary.message


def test_a_restarted_server_does_not_repeat_track_ids(serve: Any) -> None:
    """Every start counted from 1 before: after a restart a consumer keyed by track id (a
    planner, a log joined across the restart) took the new server's tracks for the old one's."""
    before = _lockstep(serve(), [_tracked("front", i) for i in range(2)])
    after = _lockstep(serve(), [_tracked("front", i) for i in range(2)])  # another server, same camera
    old = {d.track_id for a in before for d in a.detections}
    new = {d.track_id for a in after for d in a.detections}
    assert old and new and min(new) > max(old), (old, new)
    assert max(new) < 2**53  # exact as a JSON number in JavaScript


def test_first_track_ids_leave_room_between_starts() -> None:
    from perception.tracking.tracker import IDS_PER_MS, MAX_TRACK_ID, IdCounter, first_id_from_clock

    t0 = 1_800_000_000 * 10**9  # 2027
    assert first_id_from_clock(t0 + 1_000_000) - first_id_from_clock(t0) == IDS_PER_MS  # 1 ms later
    assert first_id_from_clock(7_000_000_000 * 10**9) < MAX_TRACK_ID  # the year 2191
    ids = IdCounter(first_id_from_clock(t0))
    assert ids(3) == first_id_from_clock(t0) and ids(1) == first_id_from_clock(t0) + 3
    with pytest.raises(ValueError, match="first track id"):
        IdCounter(0)


def test_a_failed_load_is_tried_again_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    from perception.tracking import TrackerConfig
    from perception.types import Detections
    from server.trackers import RETRY_S, Trackers, TrackerUnavailable

    now = [100.0]
    trackers = Trackers(TrackerConfig(), clock=lambda: now[0])
    det = Detections(np.array([[0, 0, 10, 10]], np.float32), np.array([0.9], np.float32), np.array([0]))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "perception.tracking.pool", None)
        with pytest.raises(TrackerUnavailable, match="ModuleNotFoundError"):
            trackers.update("cam", det, 1)
        m.delitem(sys.modules, "perception.tracking.pool")  # loadable again, but not yet tried
        now[0] += RETRY_S / 2
        with pytest.raises(TrackerUnavailable, match="tried again"):
            trackers.update("cam", det, 2)
    assert not trackers.loaded
    now[0] += RETRY_S
    assert trackers.update("cam", det, 3).track_ids.tolist() != [] and trackers.loaded


def test_the_server_imports_without_numba() -> None:
    """Nothing in the server's own import chain loads numba: only a tracked frame (or
    --preload-tracker) does."""
    code = ("import sys; import server.cli, server.app, server.service, server.stream, server.kserve; "
            "assert 'numba' not in sys.modules, 'numba loaded'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2], timeout=120)


def test_hostile_capture_times_and_late_frames_keep_the_stream_and_its_tracks(serve: Any) -> None:
    """A capture time of 2**63 - 1, then a frame without one, ended the whole stream with
    INTERNAL (an OverflowError in the tracker), its other cameras' answers gone; a frame that
    came after a later one of its camera reset every track of the camera."""
    run = serve()
    frames = [_tracked("front", i) for i in range(3)]
    huge = _tracked("rear", 0)
    huge.frame.capture_timestamp_ns = 2**63 - 1
    none = _tracked("rear", 1)
    none.frame.capture_timestamp_ns = 0
    late, after = _tracked("front", 4), _tracked("front", 3)  # 4 answered before 3
    answers = _lockstep(run, [*frames, huge, none, late, after, _tracked("front", 5)])
    assert len(answers) == 8 and all(a.status == pb.FRAME_STATUS_OK for a in answers)
    assert "not tracked" in answers[3].message and {d.track_id for d in answers[3].detections} == {0}
    ids = sorted(d.track_id for d in answers[0].detections)
    assert sorted(d.track_id for d in answers[5].detections) == ids  # frame 4
    assert "after a later frame" in answers[6].message and {d.track_id for d in answers[6].detections} == {0}
    assert sorted(d.track_id for d in answers[7].detections) == ids  # frame 5: the tracks went on
