"""End to end over loopback: a real server (tiny real ONNX model) and real gRPC clients."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from perception.pipeline import FramePipeline
from perception.v1 import detector_pb2 as pb
from server.metrics import DROP_REASONS
from server.scheduler import Job
from tests.server.conftest import health_check, jpeg, request, stalled_reader_channel, wait_for, window_filling_request

OK = pb.FRAME_STATUS_OK


def test_detect_returns_boxes_in_source_pixels(serve):
    run = serve()
    resp = run.stub.Detect(request("front", 7, jpeg(320, 200)), timeout=10)
    assert resp.status == OK and resp.camera_id == "front" and resp.sequence == 7
    assert (resp.image_width, resp.image_height) == (320, 200)
    assert resp.capture_timestamp_ns == 7_000_000
    assert len(resp.detections) > 0  # the tiny model's objectness leans positive
    for d in resp.detections:
        assert 0 <= d.box.x1 <= d.box.x2 <= 320 and 0 <= d.box.y1 <= d.box.y2 <= 200
        assert 0.3 <= d.score <= 1.0  # the manifest's default score threshold is 0.3
        classes = ("car", "truck", "bus", "pedestrian", "cyclist", "traffic_light", "traffic_sign")
        assert d.class_name == classes[d.class_id]
    t = resp.timings
    assert t.batch_size == 1 and t.total_us >= t.inference_us > 0 and t.preprocess_us > 0


def test_stream_several_cameras_in_order_with_garbage_mid_stream(serve):
    run = serve()
    cams = ("front", "rear", "left")
    frames = {c: [jpeg(200, 150, seed=i + 10 * k) for i in range(6)] for k, c in enumerate(cams)}

    rounds = threading.Semaphore(1)

    def requests():
        # Each camera at its own pace, like a real camera: the next round after the last answer.
        for i in range(6):
            rounds.acquire()
            for c in cams:
                data = b"\xff\xd8 not really a jpeg" if (c == "rear" and i == 3) else frames[c][i]
                yield request(c, i, data)

    answers = []
    for a in run.stub.StreamDetect(requests(), timeout=30):
        answers.append(a)
        if len(answers) % 3 == 0:
            rounds.release()
    assert len(answers) == 18
    # Every frame answered, in the order sent, per camera and overall.
    assert [(a.camera_id, a.sequence) for a in answers] == [(c, i) for i in range(6) for c in cams]
    bad = [a for a in answers if a.status != OK]
    assert [(a.camera_id, a.sequence, a.status) for a in bad] == [("rear", 3, pb.FRAME_STATUS_INVALID)]
    assert "JPEG" in bad[0].message
    for a in answers:
        if a.status == OK:
            assert (a.image_width, a.image_height) == (200, 150)
            assert all(0 <= d.box.x2 <= 200 and 0 <= d.box.y2 <= 150 for d in a.detections)
    # The server goes on serving.
    assert run.stub.Detect(request("front", 99, jpeg()), timeout=10).status == OK


@pytest.mark.parametrize(
    "frame_kw, options, needle",
    [
        ({"encoded": b""}, {}, "no image"),
        ({}, {}, "exactly one"),
        ({"encoded": jpeg()[:200]}, {}, "truncated"),
        ({"encoded": b"GIF89a" + bytes(100)}, {}, "neither JPEG nor PNG"),
        ({"raw": pb.RawImage(width=4, height=4, format=pb.PIXEL_FORMAT_BGR8, data=bytes(47))}, {}, "needs 48"),
        ({"raw": pb.RawImage(width=0, height=4, format=pb.PIXEL_FORMAT_BGR8, data=b"")}, {}, "positive"),
        ({"raw": pb.RawImage(width=100000, height=100000, format=pb.PIXEL_FORMAT_BGR8, data=b"x")}, {}, "limit"),
        ({"raw": pb.RawImage(width=4, height=4, data=bytes(48),
                             format=77)},  # type: ignore[arg-type]  # not a PixelFormat, on purpose
         {}, "pixel format"),
        ({"raw": pb.RawImage(width=4, height=4, data=bytes(48))}, {}, "no pixel format"),
        ({"encoded": jpeg()}, {"score_threshold": -0.5}, "score_threshold"),
        ({"encoded": jpeg()}, {"iou_threshold": 7.0}, "iou_threshold"),
        ({"encoded": jpeg()}, {"max_detections": 10**9}, "max_detections"),
        ({"encoded": jpeg()}, {"class_filter": [3, 42]}, "class_filter"),
        ({"encoded": jpeg()}, {"score_threshold": float("nan")}, "finite"),
    ],
)
def test_bad_input_is_invalid_argument_with_a_message(serve, frame_kw, options, needle):
    run = serve()
    req = pb.DetectRequest(frame=pb.Frame(camera_id="front", sequence=1, **frame_kw),
                           options=pb.DetectOptions(**options))
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Detect(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.value.details() or "")
    # The same input inside a stream: answered INVALID, and the stream goes on.
    out = list(run.stub.StreamDetect(iter([req, request("front", 2, jpeg())]), timeout=10))
    assert [a.status for a in out] == [pb.FRAME_STATUS_INVALID, OK]
    assert needle in out[0].message


def test_options_thresholds_filter_and_agnostic(serve):
    run = serve()
    img = jpeg(256, 192, seed=3)
    base = run.stub.Detect(request("front", 1, img), timeout=10)
    strict = run.stub.Detect(pb.DetectRequest(frame=request("front", 2, img).frame,
                                              options=pb.DetectOptions(score_threshold=0.6)), timeout=10)
    assert all(d.score >= 0.6 for d in strict.detections)
    assert len(strict.detections) <= len(base.detections)
    only = run.stub.Detect(pb.DetectRequest(frame=request("front", 3, img).frame,
                                            options=pb.DetectOptions(class_filter=[2], score_threshold=0.05)),
                           timeout=10)
    assert only.detections and {d.class_id for d in only.detections} == {2}
    capped = run.stub.Detect(pb.DetectRequest(frame=request("front", 4, img).frame,
                                              options=pb.DetectOptions(max_detections=2, score_threshold=0.05)),
                             timeout=10)
    assert len(capped.detections) == 2


def test_raw_frames_match_encoded_png(serve):
    run = serve()
    rng = np.random.default_rng(5)
    img = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    png = cv2.imencode(".png", img)[1].tobytes()
    stride = 120 * 3 + 8
    padded = np.zeros((90, stride), np.uint8)
    padded[:, : 120 * 3] = img.reshape(90, -1)
    raw_bgr = pb.RawImage(width=120, height=90, row_stride=stride, format=pb.PIXEL_FORMAT_BGR8, data=padded.tobytes())
    raw_rgb = pb.RawImage(width=120, height=90, format=pb.PIXEL_FORMAT_RGB8, data=img[:, :, ::-1].tobytes())
    a = run.stub.Detect(request("c", 1, png), timeout=10)
    b = run.stub.Detect(pb.DetectRequest(frame=pb.Frame(camera_id="c", sequence=2, raw=raw_bgr)), timeout=10)
    c = run.stub.Detect(pb.DetectRequest(frame=pb.Frame(camera_id="c", sequence=3, raw=raw_rgb)), timeout=10)
    boxes = [[(d.class_id, round(d.box.x1, 3), round(d.score, 5)) for d in r.detections] for r in (a, b, c)]
    assert boxes[0] == boxes[1] == boxes[2] and boxes[0]


def test_raw_4k_bgr_frame_needs_a_raised_message_limit(serve):
    """The default message limit (8 MiB) holds a 4K JPEG and a raw 1080p frame; a raw 4K
    frame (24.9 MB) is refused at its length prefix, before gRPC buffers it, and fits once the
    limit is raised (or goes through shared memory)."""
    data = bytes(3840 * 2160 * 3)
    req = pb.DetectRequest(frame=pb.Frame(camera_id="front", sequence=1, raw=pb.RawImage(
        width=3840, height=2160, format=pb.PIXEL_FORMAT_BGR8, data=data)))
    run = serve()
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Detect(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (err.value.details() or "")
    assert run.stub.Detect(request("front", 2, jpeg()), timeout=10).status == OK  # and it goes on
    raised = serve(max_message_bytes=32 << 20)
    resp = raised.stub.Detect(req, timeout=30)
    assert resp.status == OK and (resp.image_width, resp.image_height) == (3840, 2160)


def test_stale_frames_are_answered_dropped_in_order(serve):
    # One camera, a queue of 1; a long max_wait with a second (idle) camera stream open keeps
    # the batcher waiting, so the three frames meet while the first one waits for its batch.
    run = serve(queue_size=1, max_wait_ms=400, max_batch=4, inference_batch=4)
    frames = [request("front", i, jpeg(seed=i)) for i in range(3)]
    idle = threading.Event()

    def other():
        yield request("rear", 0, jpeg())
        idle.wait(10)

    other_call = run.stub.StreamDetect(other(), timeout=20)
    next(other_call)  # the "rear" queue now exists and stays known (idle)
    try:
        out = list(run.stub.StreamDetect(iter(frames), timeout=20))
    finally:
        idle.set()
    # Frame 0 is taken for decoding while the engine can take it; frames 1 and 2 wait
    # undecoded behind it, and 2 replaces 1, which is answered stale without being decoded.
    assert [a.sequence for a in out] == [0, 1, 2]
    assert [a.status for a in out] == [OK, pb.FRAME_STATUS_DROPPED_STALE, OK]
    assert "newer frame of this camera arrived before this one was decoded" in out[1].message


def test_deadline_expired(serve):
    run = serve(max_wait_ms=300, max_batch=8, inference_batch=8)

    def reqs():
        yield request("rear", 0, jpeg())
        time.sleep(0.05)
        yield request("front", 1, jpeg(), deadline_ms=20)

    out = list(run.stub.StreamDetect(reqs(), timeout=20))
    assert [a.status for a in out] == [OK, pb.FRAME_STATUS_EXPIRED]
    assert "deadline" in out[1].message
    # A generous deadline is met.
    ok = run.stub.Detect(request("front", 2, jpeg(), deadline_ms=5000), timeout=10)
    assert ok.status == OK


def test_overload_is_resource_exhausted_not_unbounded_queueing(serve):
    run = serve(max_pending=1, max_wait_ms=400, max_batch=8, inference_batch=8)
    img = jpeg()
    codes: list[str] = []
    lock = threading.Lock()
    # Hold a stream open (idle), so the batcher waits for frames from it before each batch.
    hold = threading.Event()

    def idle():
        yield request("rear", 0, img)
        hold.wait(10)

    held = run.stub.StreamDetect(idle(), timeout=20)
    next(held)

    def call(i: int) -> None:
        try:
            r = run.stub.Detect(request(f"cam{i}", i, img), timeout=10)
            code = "OK" if r.status == OK else str(r.status)
        except grpc.RpcError as exc:
            code = exc.code().name
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hold.set()
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes


def test_client_that_stops_reading_does_not_grow_the_server(serve):
    run = serve(outbox_size=4, queue_size=1)
    from perception.v1 import detector_pb2_grpc as pb_grpc

    channel = stalled_reader_channel(run.address)
    stub = pb_grpc.DetectorStub(channel)
    consumed = 0

    def reqs():
        nonlocal consumed
        for i in range(300):
            consumed += 1
            yield window_filling_request("front", i)

    call = stub.StreamDetect(reqs(), timeout=30)
    time.sleep(2.0)  # never read: the server must stop taking frames
    taken = consumed
    assert taken < 100, f"server kept reading {taken} frames from a client that reads nothing"
    assert run.server.scheduler.pending <= 1
    call.cancel()
    channel.close()
    deadline = time.monotonic() + 5
    while run.server.scheduler.queue_count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.server.scheduler.queue_count == 0 and run.server.scheduler.pending == 0


def test_model_info_health_and_reflection(serve):
    run = serve()
    info = run.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert info.name == "tiny" and info.classes[0] == "car" and info.input_width == 64
    assert info.backend == "onnxruntime-cpu" and info.max_batch == 8 and '"classes"' in info.manifest_json
    check = health_check(run.channel)
    for svc in ("", "perception.v1.Detector"):
        status = check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(run.channel)
    list_services = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    # types-grpcio-reflection declares this generated RPC as `binascii.Incomplete` (an exception class).
    resp = next(refl.ServerReflectionInfo(list_services, timeout=5))  # type: ignore[operator]  # mistyped stub, above
    names = {s.name for s in resp.list_services_response.service}
    assert {"perception.v1.Detector", "grpc.health.v1.Health"} <= names


def test_shutdown_answers_in_flight_then_refuses(serve):
    run = serve(max_wait_ms=300, max_batch=8, inference_batch=8)
    results: list = []

    def call():
        results.append(run.stub.Detect(request("front", 1, jpeg()), timeout=10))

    # A held-open idle stream makes the batcher wait ~300 ms: the frame is in flight at stop.
    hold = threading.Event()

    def idle():
        yield request("rear", 0, jpeg())
        hold.wait(5)

    held = run.stub.StreamDetect(idle(), timeout=20)
    next(held)
    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.1)
    assert run.server.shutdown(3.0) in (True, False)
    t.join(5)
    hold.set()
    assert results and results[0].status == OK
    check = health_check(run.channel)
    with pytest.raises(grpc.RpcError):
        check(health_pb2.HealthCheckRequest(), timeout=2)


def test_metrics_count_every_answer(serve):
    run = serve()
    reg = run.registry
    reqs = [request("front", 0, jpeg()), request("front", 1, b"junk"), request("rear", 2, jpeg())]
    out = list(run.stub.StreamDetect(iter(reqs), timeout=10))
    with pytest.raises(grpc.RpcError):
        run.stub.Detect(request("front", 3, b""), timeout=5)
    assert [a.status for a in out] == [OK, pb.FRAME_STATUS_INVALID, OK]
    get = reg.get_sample_value
    assert get("perception_frames_received_total", {"camera": "front"}) == 3
    assert get("perception_frames_answered_total", {"camera": "front"}) == 1
    assert get("perception_frames_dropped_total", {"camera": "front", "reason": "invalid"}) == 2
    assert get("perception_stage_latency_seconds_count", {"stage": "end_to_end"}) == 2
    assert get("perception_grpc_errors_total", {"method": "Detect", "code": "INVALID_ARGUMENT"}) == 1
    n_det = sum(len(a.detections) for a in out)
    counted = sum(s.value for m in reg.collect() if m.name == "perception_detections" for s in m.samples
                  if s.name.endswith("_total"))
    assert counted == n_det > 0


def test_stream_over_capacity_answers_overloaded_and_goes_on(serve):
    run = serve(max_pending=1, max_wait_ms=400, max_batch=8, inference_batch=8)
    hold = threading.Event()

    def idle():
        yield request("rear", 0, jpeg())
        hold.wait(10)

    held = run.stub.StreamDetect(idle(), timeout=20)
    next(held)  # a known, idle queue: the batcher waits up to 400 ms for it
    try:
        out = list(run.stub.StreamDetect(iter([request("a", 0, jpeg()), request("b", 1, jpeg())]), timeout=20))
    finally:
        hold.set()
    assert [(a.camera_id, a.status) for a in out] == [("a", OK), ("b", pb.FRAME_STATUS_OVERLOADED)]
    assert "over capacity" in out[1].message
    assert run.stub.Detect(request("c", 2, jpeg()), timeout=10).status == OK


def test_camera_allow_list(serve):
    run = serve(cameras=("front", "rear"))
    assert run.stub.Detect(request("front", 1, jpeg()), timeout=10).status == OK
    with pytest.raises(grpc.RpcError) as err:
        run.stub.Detect(request("intruder", 1, jpeg()), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "allow-list" in (err.value.details() or "")


def test_camera_faster_than_the_server_is_shed_before_decoding(serve):
    run = serve(queue_size=1)
    big = jpeg(1280, 720, seed=4)  # slow enough to decode that a burst backs up
    out = list(run.stub.StreamDetect(iter([request("front", i, big) for i in range(40)]), timeout=30))
    assert [a.sequence for a in out] == list(range(40))  # every frame answered, in order
    assert out[-1].status == OK  # the latest frame always wins
    early = [a for a in out if a.status == pb.FRAME_STATUS_DROPPED_STALE and "before this one was decoded" in a.message]
    assert early, "a burst should be shed before it is decoded"
    assert all(a.timings.preprocess_us == 0 for a in early)


def test_not_serving_until_warm(tiny_manifest):
    import socket

    from prometheus_client import CollectorRegistry

    from perception.v1 import detector_pb2_grpc as pb_grpc
    from server.app import create_server
    from server.config import ServerConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServerConfig(model=str(tiny_manifest), host="127.0.0.1", port=port, metrics_port=0, threads=1,
                       warmup_iters=4000)  # a few seconds of warm-up on the tiny model
    started: list = []
    t = threading.Thread(target=lambda: started.append(create_server(cfg, CollectorRegistry())))
    t.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
        ("grpc.max_reconnect_backoff_ms", 50)])
    check = health_check(channel)
    seen = set()
    code = None
    try:
        deadline = time.monotonic() + 60
        while t.is_alive() and time.monotonic() < deadline:
            try:
                status = check(health_pb2.HealthCheckRequest(), timeout=1).status
                seen.add(status)
                if status == health_pb2.HealthCheckResponse.NOT_SERVING and code is None:
                    got: grpc.StatusCode | str
                    try:
                        pb_grpc.DetectorStub(channel).Detect(request("front", 1, jpeg()), timeout=2)
                        got = "OK"
                    except grpc.RpcError as exc:
                        got = exc.code()
                    # Only conclusive if the server was still warming up after the call.
                    if check(health_pb2.HealthCheckRequest(), timeout=1).status == status:
                        code = got
            except grpc.RpcError:
                pass  # not bound yet
            time.sleep(0.02)
        t.join()
        assert health_pb2.HealthCheckResponse.NOT_SERVING in seen
        assert code == grpc.StatusCode.UNAVAILABLE
        assert check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
        for server, _ in started:
            server.shutdown(1)


def test_on_a_cpu_frames_run_one_at_a_time_on_every_worker_and_answers_stay_in_order(serve):
    """The CPU default: one frame per inference run, two runs at once (inference_workers=2 here,
    whatever this machine's cores), while the model still takes and advertises its full batch."""
    run = serve(inference_workers=2, queue_size=8)
    frames = [request(f"cam{i % 4}", i, jpeg(seed=i % 3)) for i in range(24)]
    out = list(run.stub.StreamDetect(iter(frames), timeout=30))
    assert [a.sequence for a in out] == list(range(24))
    ok = [a for a in out if a.status == OK]
    assert ok and all(a.timings.batch_size == 1 for a in ok)
    assert run.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).max_batch > 1
    # Told otherwise, frames of several cameras share a run again.
    batched = serve(inference_workers=1, inference_batch=8, max_wait_ms=50, queue_size=8)
    out = list(batched.stub.StreamDetect(iter(frames), timeout=30))
    assert max(a.timings.batch_size for a in out if a.status == OK) > 1


def test_reuse_port_lets_two_servers_share_a_port_and_spreads_connections(serve):
    """--reuse-port: several server processes (here two servers) on one port, the kernel handing
    each new connection to one of them. Off (the default), a taken port fails the start."""
    import socket

    from perception.errors import PerceptionError
    from perception.v1 import detector_pb2_grpc as pb_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = serve(channel=False, port=port, reuse_port=True)
    b = serve(channel=False, port=port, reuse_port=True)
    assert a.port == b.port == port
    served = {id(a.registry): 0, id(b.registry): 0}
    for i in range(40):  # a connection of its own each (no shared subchannel), as separate camera nodes
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            assert pb_grpc.DetectorStub(ch).Detect(request("front", i, jpeg()), timeout=10).status == OK
        finally:
            ch.close()
        for run in (a, b):
            served[id(run.registry)] = int(run.registry.get_sample_value(
                "perception_frames_received_total", {"camera": "front"}) or 0)
        if all(served.values()):
            break
    assert all(served.values()), f"one server took every connection: {served}"
    with pytest.raises((PerceptionError, RuntimeError, OSError)):
        serve(channel=False, port=port)  # without --reuse-port: the port is taken


def _hold_the_engine(run: Any, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Keep the server's one inference worker (inference_workers=1) busy until the returned Event
    is set: a Detect call of camera "busy" runs, and its inference waits for the Event."""
    backend = run.server.models.current.backend
    infer, running, release = backend.infer, threading.Event(), threading.Event()

    def held(batch: Any) -> Any:
        running.set()
        release.wait(20)
        return infer(batch)

    def busy() -> None:
        # Its answer is not under test. A slow machine may still be running it when the test's
        # server stops, and the call then ends in an error; that must not fail the test.
        with contextlib.suppress(grpc.RpcError):
            run.stub.Detect(request("busy", 0, jpeg()), timeout=30)

    monkeypatch.setattr(backend, "infer", held)
    threading.Thread(target=busy, name="busy-detect", daemon=True).start()
    assert running.wait(10)
    return release


@pytest.mark.parametrize("case, code, reason", [
    ("over capacity", grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"),
    ("client gone", grpc.StatusCode.CANCELLED, "cancelled"),
    ("queue closed", grpc.StatusCode.UNAVAILABLE, "cancelled"),
    ("pre-processing bug", grpc.StatusCode.INTERNAL, "invalid"),
])
def test_a_unary_frame_left_unanswered_is_counted_dropped_once(serve, monkeypatch, case, code, reason):
    """A Detect call's frame that gets no answer is counted dropped, for the reason a stream's
    frame is dropped for in the same case: refused over capacity, its client gone (cancelled)
    while it waits, its queue closed under it (CANCELLED), an unexpected pre-processing error.
    It used to be counted received only."""
    run = serve(inference_workers=1, max_pending=1)
    scheduler, metrics = run.server.scheduler, run.server.metrics
    count_drop, dropped = metrics.frame_dropped, threading.Event()

    def frame_dropped(camera_id: str, why: str) -> None:
        count_drop(camera_id, why)
        if camera_id == "front":
            dropped.set()

    monkeypatch.setattr(metrics, "frame_dropped", frame_dropped)
    release = threading.Event()  # lets a held engine go, at the end
    if case == "pre-processing bug":
        def prepare(*args: Any) -> Any:
            raise MemoryError("no room for this frame")

        monkeypatch.setattr(FramePipeline, "prepare", prepare)
    else:  # the frame cannot run at once: it is queued, or refused when no room is left
        release = _hold_the_engine(run, monkeypatch)
    if case == "over capacity":  # the one frame max_pending allows, of a class no Detect call may shed
        scheduler.submit(Job("filler", None, lambda result: None, priority=2))
    queued = threading.Event()
    if case in ("queue closed", "client gone"):
        submit = scheduler.submit

        def submitted(job: Job, transient: bool = False) -> None:
            submit(job, transient)
            if case == "queue closed":
                scheduler.close(job.key)  # as the end of a stream closes its queues
            queued.set()

        monkeypatch.setattr(scheduler, "submit", submitted)
    frame = request("front", 1, jpeg())
    try:
        if case == "client gone":
            call = run.stub.Detect.future(frame, timeout=10)
            assert queued.wait(10)
            call.cancel()
            got = call.code()
        else:
            with pytest.raises(grpc.RpcError) as err:
                run.stub.Detect(frame, timeout=10)
            got = err.value.code()
        assert got == code
        assert dropped.wait(10), "the frame was not counted dropped"  # the server notices a client gone later
    finally:
        scheduler.close("filler")
        release.set()
    get = run.registry.get_sample_value
    assert get("perception_frames_received_total", {"camera": "front"}) == 1
    assert get("perception_frames_dropped_total", {"camera": "front", "reason": reason}) == 1
    assert sum(get("perception_frames_dropped_total", {"camera": "front", "reason": r}) or 0 for r in DROP_REASONS) == 1
    assert not get("perception_frames_answered_total", {"camera": "front"})


def test_a_unary_frame_waiting_for_the_engine_no_longer_holds_its_bytes(serve, monkeypatch):
    """Once a Detect call's frame is prepared its encoded bytes are let go, as a stream's are:
    gRPC holds the call's request until the call returns, and a frame queued behind a busy
    engine kept its bytes (up to the message limit) beside its tensor until its answer."""
    import server.service as service_module
    from server.wire import Received

    received: list[Received] = []
    parse = service_module.parse_detect_request

    def parse_and_keep(data: bytes) -> Any:
        request = parse(data)
        if isinstance(request, Received) and request.request.frame.camera_id == "front":
            received.append(request)
        return request

    monkeypatch.setattr(service_module, "parse_detect_request", parse_and_keep)  # bound when the server is made
    run = serve(inference_workers=1)
    release = _hold_the_engine(run, monkeypatch)
    frame = jpeg(640, 480)
    try:
        call = run.stub.Detect.future(request("front", 1, frame), timeout=20)
        assert wait_for(lambda: bool(received) and received[0].payload.nbytes == 0, 10), (
            "the frame waits for the engine with its encoded bytes still held")
        assert not call.done() and received[0].size > len(frame), "the frame was answered before the check"
    finally:
        release.set()
    answer = call.result()
    assert answer.status == OK and (answer.image_width, answer.image_height) == (640, 480)
