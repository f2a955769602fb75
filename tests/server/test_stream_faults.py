"""Faults on one frame answer that frame and keep the stream going; a failed start leaks
nothing; camera ids cannot grow the metrics without bound."""

from __future__ import annotations

import queue
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest

from perception.errors import ModelError, NotReadyError
from perception.manifest import (
    Manifest,
    PostprocessSpec,
    Precision,
    PreprocessSpec,
    Variant,
    load_manifest,
    save_manifest,
    sha256_file,
)
from perception.pipeline import FramePipeline
from perception.types import FrameStatus
from perception.v1 import detector_pb2 as pb
from server import convert
from server.answer import FrameTask
from server.app import create_server
from server.config import ServerConfig
from server.limits import ServiceLimits
from server.metrics_protocol import NULL_METRICS, NullMetrics
from server.scheduler import Job, JobStatus, Scheduler
from server.stream import Identifier, StreamSession
from tests.server.conftest import jpeg, request
from tests.tiny_model import CLASSES, make_tiny_onnx

OK = pb.FRAME_STATUS_OK


def test_unexpected_preprocessing_error_answers_the_frame_and_goes_on(serve, monkeypatch):
    run = serve()
    original = FramePipeline.prepare

    def prepare(self: FramePipeline, frame: Any, req: Any) -> Any:
        if frame.camera_id == "boom":
            raise MemoryError("no room for this frame")
        return original(self, frame, req)

    monkeypatch.setattr(FramePipeline, "prepare", prepare)
    reqs = [request("front", 0, jpeg()), request("boom", 1, jpeg()), request("front", 2, jpeg())]
    out = list(run.stub.StreamDetect(iter(reqs), timeout=10))  # before the fix: hangs, then DEADLINE
    assert [(a.camera_id, a.status) for a in out] == [("front", OK), ("boom", pb.FRAME_STATUS_INVALID), ("front", OK)]
    assert re.fullmatch(r"internal error while pre-processing this frame \(error id [0-9a-f]{12}\)", out[1].message)
    get = run.registry.get_sample_value
    assert get("perception_grpc_errors_total", {"method": "StreamDetect", "code": "INTERNAL"}) == 1


def _fail_once(owner: Any, method: str, error: Exception) -> None:
    """Make ``owner``'s next call of ``method`` raise ``error``, once."""
    call = getattr(owner, method)
    failed = threading.Event()

    def flaky(*args: Any) -> Any:
        if not failed.is_set():
            failed.set()
            raise error
        return call(*args)

    setattr(owner, method, flaky)


def _fail_first_batch(run: Any) -> None:
    """Make the server's next inference fail (as a broken engine would), once."""
    # The served model: each batch runs on its backend.
    _fail_once(run.server.models.current.backend, "infer",
               ModelError("CUDA error: an illegal memory access was encountered"))


def _fail_first_finish(run: Any) -> None:
    """Make the served model's next post-processing fail (an output its layout cannot decode), once."""
    _fail_once(run.server.models.current.pipeline, "finish", ValueError("the output does not match the model's layout"))


def test_failed_inference_answers_the_frame_and_the_stream_goes_on(serve):
    run = serve()
    _fail_first_batch(run)
    answers: queue.Queue[pb.DetectResponse] = queue.Queue()

    def one_at_a_time() -> Iterator[pb.DetectRequest]:
        for seq in range(3):
            yield request("front", seq, jpeg(seed=seq))
            answers.get(timeout=10)  # the next frame only after this one's answer

    out = []
    for a in run.stub.StreamDetect(one_at_a_time(), timeout=20):  # before the fix: INTERNAL
        out.append(a)
        answers.put(a)
    assert [(a.sequence, a.status) for a in out] == [(0, pb.FRAME_STATUS_OVERLOADED), (1, OK), (2, OK)]
    # A reason and an id to find the details in the log; the engine's own text stays there.
    assert re.fullmatch(r"inference failed \(error id [0-9a-f]{12}\); frame not processed", out[0].message)
    assert "CUDA" not in out[0].message
    get = run.registry.get_sample_value
    assert get("perception_grpc_errors_total", {"method": "StreamDetect", "code": "INTERNAL"}) == 1
    # Counted as a model error, not as load shed (it used to be reason="overloaded").
    assert get("perception_frames_dropped_total", {"camera": "front", "reason": "error"}) == 1
    assert not get("perception_frames_dropped_total", {"camera": "front", "reason": "overloaded"})


@pytest.mark.parametrize("stage", ["inference", "post-processing"])
@pytest.mark.parametrize("method", ["StreamDetect", "Detect"])
def test_a_frame_the_server_fails_on_is_counted_internal_and_dropped_once(serve, method, stage):
    """Inference or post-processing failing on a frame counts INTERNAL under the call's method
    (a stream answers the frame and goes on) and the frame dropped for "error", once. A stream
    used to count no INTERNAL for post-processing; a unary call counted the frame received only."""
    run = serve()
    (_fail_first_batch if stage == "inference" else _fail_first_finish)(run)
    if method == "Detect":
        with pytest.raises(grpc.RpcError) as err:
            run.stub.Detect(request("front", 0, jpeg()), timeout=10)
        assert err.value.code() == grpc.StatusCode.INTERNAL
    else:
        out = list(run.stub.StreamDetect(iter([request("front", 0, jpeg())]), timeout=10))
        assert [a.status for a in out] == [pb.FRAME_STATUS_OVERLOADED]
    get = run.registry.get_sample_value
    assert get("perception_grpc_errors_total", {"method": method, "code": "INTERNAL"}) == 1
    assert get("perception_frames_received_total", {"camera": "front"}) == 1
    assert get("perception_frames_dropped_total", {"camera": "front", "reason": "error"}) == 1
    assert not get("perception_frames_answered_total", {"camera": "front"})


def test_failed_inference_of_a_unary_call_is_internal(serve):
    run = serve()
    _fail_first_batch(run)
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Detect(request("front", 0, jpeg()), timeout=10)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert run.stub.Detect(request("front", 1, jpeg()), timeout=10).status == OK


def test_camera_labels_are_bounded_without_an_allow_list(serve):
    run = serve(max_camera_labels=2)
    long_id = "x" * 129
    reqs = [request(f"cam{i}", i, jpeg()) for i in range(5)] + [request(long_id, 5, jpeg())]
    out = list(run.stub.StreamDetect(iter(reqs), timeout=10))
    assert [a.status for a in out] == [OK] * 5 + [pb.FRAME_STATUS_INVALID]
    assert "longer than 128" in out[5].message
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Detect(request("y" * 129, 6, jpeg()), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    labels = {s.labels["camera"] for m in run.registry.collect() if m.name == "perception_frames_received"
              for s in m.samples}
    assert labels == {"cam0", "cam1", "other"}
    get = run.registry.get_sample_value
    assert get("perception_frames_received_total", {"camera": "other"}) == 4  # cam2..cam4 + the long id


class _CancelDuringSubmit(Scheduler):
    """A real scheduler; the stream is cancelled just before a submit gets through (the race)."""

    session: StreamSession | None = None

    def run_if_idle(self, job: Job, transient: bool = False) -> bool:
        return False  # the race under test is on the queued path

    def submit(self, job: Job, transient: bool = False) -> None:
        if self.session is not None:
            self.session.cancel()
        super().submit(job, transient)


def _no_boxes(batch: np.ndarray) -> dict[str, np.ndarray]:
    """An engine that sees nothing: (B, 1, 5 + C) zeros."""
    return {"output": np.zeros((len(batch), 1, 5 + len(CLASSES)), np.float32)}


def _session(pipeline: FramePipeline, scheduler: Scheduler, draining: Any = lambda: False,
             limits: ServiceLimits | None = None, identify: Identifier = convert.identify,
             kind: type[StreamSession] = StreamSession) -> StreamSession:
    return kind(pipeline, scheduler, convert.frame_from_proto, identify, NULL_METRICS, 8, lambda camera: None,
                draining, limits)


def test_a_request_read_as_the_stream_ends_gives_its_bytes_back(tiny_manifest: Path):
    """The reader took a request off the wire; the call ended (cancel) before it was queued.
    Its bytes go back to the server's budget: before the fix each such end kept a frame's worth
    of the 256 MiB budget for good, until every frame was refused as over budget."""
    pipeline = FramePipeline.from_manifest(load_manifest(tiny_manifest))
    scheduler = Scheduler(_no_boxes, 4, 0.0, 2, 64, to_batch=pipeline.to_batch)
    limits = ServiceLimits()
    session = _session(pipeline, scheduler, limits=limits)
    session.cancel()
    session._take(request("front", 0, jpeg()))
    assert limits.undecoded.used == 0 and session._bytes.used == 0
    assert not session._inbox and not session._outbox


class _Counts(NullMetrics):
    def __init__(self) -> None:
        self.received = 0
        self.dropped: dict[str, int] = {}

    def frame_received(self, camera_id: str) -> None:
        self.received += 1

    def frame_dropped(self, camera_id: str, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def test_the_frames_a_cancelled_stream_still_held_are_counted_dropped(tiny_manifest: Path):
    """Frames received and not yet answered when the stream ends, and one read off the wire as
    it ended, are counted dropped ("cancelled"): they used to be counted received only, so
    received frames did not add up to answered plus dropped ones."""
    pipeline = FramePipeline.from_manifest(load_manifest(tiny_manifest))
    scheduler = Scheduler(_no_boxes, 4, 0.0, 2, 64, to_batch=pipeline.to_batch)
    counts = _Counts()
    session = StreamSession(pipeline, scheduler, convert.frame_from_proto, convert.identify, counts, 8,
                            lambda camera: None, lambda: False, None)
    for seq in range(3):  # no decode thread runs: they stay held
        session._take(request("front", seq, jpeg()))
    session.cancel()
    session._take(request("front", 3, jpeg()))
    assert counts.received == 4 and counts.dropped == {"cancelled": 4}


def test_an_unexpected_error_in_the_hand_off_answers_the_frame(tiny_manifest: Path, caplog):
    """A bug between decoding and the batcher answers the frame OVERLOADED with an error id,
    where it used to end the stream's decode thread and leave the stream hanging."""
    pipeline = FramePipeline.from_manifest(load_manifest(tiny_manifest))

    class Broken(Scheduler):
        def run_if_idle(self, job: Job, transient: bool = False) -> bool:
            raise RuntimeError("hand-off bug")

    scheduler = Broken(_no_boxes, 4, 0.0, 2, 64, to_batch=pipeline.to_batch)
    scheduler._accepting = True
    session = _session(pipeline, scheduler)
    req = request("front", 0, jpeg())
    camera_id, seq, ts, deadline_ms = convert.identify(req)
    task = FrameTask(camera_id, seq, ts, deadline_ms=deadline_ms)
    session._accept(task, req)
    assert task.done.is_set() and task.status is FrameStatus.OVERLOADED
    assert re.search(r"internal error while queueing this frame \(error id [0-9a-f]{12}\)", task.message)
    assert "hand-off bug" in caplog.text and "hand-off bug" not in task.message


def test_a_frame_runs_on_the_streams_thread_only_on_a_stream_of_one_camera(tiny_manifest: Path):
    """The fast path runs a frame on the stream's decode thread; on a stream carrying several
    cameras a frame of one camera would then wait undecoded for another's inference, so only a
    stream that has carried one camera runs its frames inline."""
    pipeline = FramePipeline.from_manifest(load_manifest(tiny_manifest))
    offered: list[str] = []

    class Recording(Scheduler):
        def run_if_idle(self, job: Job, transient: bool = False) -> bool:
            key = cast(tuple[int, str], job.key)  # (stream id, camera id)
            offered.append(key[1])
            return False

    scheduler = Recording(_no_boxes, 1, 0.0, 2, 64, to_batch=pipeline.to_batch)
    scheduler._accepting = True  # the worker is not started: the jobs stay queued
    session = _session(pipeline, scheduler)
    for camera in ("front", "rear"):
        req = request(camera, 0, jpeg())
        camera_id, seq, ts, deadline_ms = convert.identify(req)
        session._in_flight[camera_id] = session._in_flight.get(camera_id, 0) + 1  # as the decode loop counts it
        session._accept(FrameTask(camera_id, seq, ts, deadline_ms=deadline_ms), req)
    assert offered == ["front"], "rear's frame went inline on a stream of two cameras"
    session.cancel()


def test_cancel_between_accept_and_submit_leaves_no_queue(tiny_manifest: Path):
    pipeline = FramePipeline.from_manifest(load_manifest(tiny_manifest))
    scheduler = _CancelDuringSubmit(_no_boxes, 4, 0.0, 2, 64, to_batch=pipeline.to_batch)
    scheduler._accepting = True  # the worker is not started: the job stays queued
    session = scheduler.session = _session(pipeline, scheduler)
    req = request("front", 0, jpeg())
    camera_id, seq, ts, deadline_ms = convert.identify(req)
    task = FrameTask(camera_id, seq, ts, deadline_ms=deadline_ms)
    session._accept(task, req)
    # Before the fix the queue re-created by submit stayed forever (batches wait for it).
    assert (session.id, "front") not in scheduler._queues
    assert task.done.is_set() and task.result is not None and task.result.status is JobStatus.CANCELLED


def test_request_taken_while_draining_is_answered(tiny_manifest: Path):
    pipeline = FramePipeline.from_manifest(load_manifest(tiny_manifest))
    scheduler = Scheduler(_no_boxes, 4, 0.0, 2, 64, to_batch=pipeline.to_batch)
    scheduler.start()
    drain = threading.Event()
    first_answered = threading.Event()

    def draining() -> bool:
        # Only the reader sees the drain, so the answer loop cannot end first (deterministic).
        return drain.is_set() and threading.current_thread().name.endswith("-reader")

    def reqs() -> Iterator[pb.DetectRequest]:
        yield request("front", 0, jpeg())
        first_answered.wait(10)
        drain.set()
        yield request("front", 1, jpeg())  # pulled off the wire, then the server drains

    session = _session(pipeline, scheduler, draining)
    out = []
    try:
        with pytest.raises(NotReadyError):
            for a in session.answers(reqs()):
                out.append(a)
                first_answered.set()
    finally:
        scheduler.stop(2)
    assert [(a.sequence, a.status) for a in out] == [(0, "OK"), (1, "OVERLOADED")]
    assert "shutting down" in out[1].message


@pytest.mark.parametrize("end", ["drain the reader sees", "drain as it is taken", "idle timeout"])
def test_a_frame_being_taken_in_is_answered_before_the_stream_ends(tiny_manifest: Path, end):
    """The reader has frame 1 off the wire and is still taking it in (identifying it, stalled
    here) when the answer loop finds the outbox empty and the server draining, or the stream
    quiet past its idle timeout. The stream used to end there, frame 1 unanswered.

    The stall lasts until the stream ended, or the answer loop looked at the drain or its idle
    clock three times while either called for an end. Before the fix it ended at its first or
    second such look (one in its wait's timeout, then one in its check): a third is a loop that
    waits for the frame."""
    pipeline = FramePipeline.from_manifest(load_manifest(tiny_manifest))
    scheduler = Scheduler(_no_boxes, 4, 0.0, 2, 64, to_batch=pipeline.to_batch)
    scheduler.start()
    idle_s = 0.5 if end == "idle timeout" else 60.0
    drain, taking, decided, first_answered, hold = (threading.Event() for _ in range(5))
    answering = threading.current_thread()  # the answer loop runs on the thread iterating answers()
    looks = 0

    def draining() -> bool:
        nonlocal looks
        if threading.current_thread() is not answering:
            return drain.is_set()
        if not taking.is_set():  # the answer loop sees the drain once the reader has frame 1
            return False
        quiet_s = time.monotonic() - max(session._last_request, session._last_answer)
        if drain.is_set() or quiet_s > idle_s:
            looks += 1
            if looks == 3:
                decided.set()
        return drain.is_set()

    def identify(req: Any) -> tuple[str, int, int, int]:
        if req.frame.sequence == 1:
            if end == "drain as it is taken":
                drain.set()  # after the reader's own look: frame 1 is taken in as any other
            taking.set()
            decided.wait(10)
        return convert.identify(req)

    def reqs() -> Iterator[pb.DetectRequest]:
        yield request("front", 0, jpeg())
        first_answered.wait(10)
        if end == "drain the reader sees":
            drain.set()
        yield request("front", 1, jpeg())
        hold.wait(10)  # the client keeps the stream open, sending nothing

    class Ending(StreamSession):
        def cancel(self) -> None:
            super().cancel()
            decided.set()  # the stream ended: the answer loop's last act

    session = _session(pipeline, scheduler, draining, ServiceLimits(stream_idle_timeout_s=idle_s), identify, Ending)
    out = []
    try:
        with pytest.raises(NotReadyError) as err:
            for a in session.answers(reqs()):
                out.append((a.sequence, a.status.name))
                first_answered.set()
    finally:
        hold.set()
        scheduler.stop(2)
    # Off the wire once the drain began, frame 1 is refused; in the server before, it is inferred.
    assert out == [(0, "OK"), (1, "OVERLOADED" if end == "drain the reader sees" else "OK")]
    assert ("sent no frame" if end == "idle timeout" else "shutting down") in str(err.value)


def _mismatched_manifest(directory: Path) -> Path:
    """A manifest whose ONNX model takes 32x24 while the manifest says 64x48: loads, fails to infer."""
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / "model.fp32.onnx"
    make_tiny_onnx(onnx_path, 32, 24)
    manifest = Manifest(
        name="broken", version="0.0.1", classes=CLASSES,
        preprocess=PreprocessSpec(input_width=64, input_height=48),
        postprocess=PostprocessSpec(score_threshold=0.3, iou_threshold=0.5, max_detections=50),
        variants=(Variant(name="fp32", file=onnx_path.name, precision=Precision.FP32, sha256=sha256_file(onnx_path),
                          input_shape=(-1, 3, 48, 64), max_batch=2),),
        default_variant="fp32",
        provenance={"source": "tests/server/test_stream_faults.py"},
    )
    return save_manifest(manifest, directory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_failed_warm_up_stops_the_server_and_releases_the_port(tmp_path: Path):
    port = _free_port()
    config = ServerConfig(model=str(_mismatched_manifest(tmp_path / "broken")), host="127.0.0.1", port=port,
                          metrics_port=0, threads=1, warmup_iters=1, backends=("onnxruntime-cpu",))
    with pytest.raises(ModelError) as err:
        create_server(config)
    # The port is free again: a new server binds it (before the fix the old one still held it).
    again = grpc.server(futures.ThreadPoolExecutor(1),
                        options=[("grpc.so_reuseport", 0)])
    try:
        assert again.add_insecure_port(f"127.0.0.1:{port}") == port
    finally:
        again.stop(0)
    assert "failed its warm-up inference" in str(err.value) and "broken" in str(err.value)


def test_a_stream_that_is_not_read_holds_a_bounded_amount_of_model_output(tiny_manifest: Path):
    """Frames inferred and waiting to be answered hold their model output until then (it is
    post-processed when the frame's turn comes). Only their requests' bytes were counted
    against --max-stream-inflight-bytes: a client sending small frames that stopped reading
    had every frame decoded and inferred until the outbox was full, each holding its output
    (2.8 MB a frame for a YOLOv8 COCO head). Here each output is 1 MB and the stream may hold
    2 MB: the reader stops taking frames after about two, not after the outbox's eight. (A
    burst read before any is inferred is bounded by the outbox, as before.)"""
    pipeline = FramePipeline.from_manifest(load_manifest(tiny_manifest))

    def big_head(batch: np.ndarray) -> dict[str, np.ndarray]:  # sees nothing, in 1 MB a frame
        return {"output": np.zeros((len(batch), (1 << 20) // (4 * (5 + len(CLASSES))), 5 + len(CLASSES)),
                                   np.float32)}

    scheduler = Scheduler(big_head, 4, 0.0, 2, 64, to_batch=pipeline.to_batch)
    scheduler.start()
    session = _session(pipeline, scheduler, limits=ServiceLimits(stream_inflight_bytes=2 << 20))
    read: list[int] = []

    def frames() -> Iterator[pb.DetectRequest]:  # a camera's pace: each frame inferred before the next comes
        for i in range(12):
            if i:
                time.sleep(0.15)
            read.append(i)
            yield request("front", i, jpeg(seed=i))

    try:
        answers = session.answers(frames())
        first = next(answers)  # then the client stops reading
        assert first.sequence == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with session._lock:
                held = [t.output_bytes for t in session._outbox]
                if sum(1 for n in held if n) >= 2:
                    break
            time.sleep(0.01)
        time.sleep(1.5)  # time for the reader to read on (ten frames' worth), were it allowed
        with session._lock:
            outputs = sum(t.output_bytes for t in session._outbox)
        assert len(read) <= 5, read  # two inferred frames and what was read before they were (the outbox: 8)
        assert outputs <= 4 << 20
        rest = [a.sequence for a in answers]  # reading again: every frame answered, in order
        assert [first.sequence, *rest] == list(range(12))
    finally:
        session.cancel()
        scheduler.stop(timeout=2)
