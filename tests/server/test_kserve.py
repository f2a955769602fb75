"""The KServe v2 front door over loopback, driven by the stock ``tritonclient[grpc]``.

tritonclient cannot run in the test's process: it pins protobuf<7, while the project's stubs
are generated for the protobuf 7 runtime, and its own ``inference.*`` messages (Triton's
grpc_service.proto) collide with the vendored KServe ones in protobuf's default descriptor pool.
So one venv per session gets tritonclient (a few seconds with pip's cache), and each test runs
its client calls in one subprocess on that interpreter (``_client_main``, sent as source).
Hand-built requests that no stock client would send go through a plain gRPC channel instead.
"""

from __future__ import annotations

import base64
import dataclasses
import inspect
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry

from perception.manifest import load_manifest
from perception.pipeline import FramePipeline
from perception.v1 import detector_pb2 as pb
from perception.v1 import detector_pb2_grpc as pb_grpc
from perception.v1 import grpc_predict_v2_pb2 as kpb
from perception.v1 import model_config_pb2 as mcpb
from server import convert
from server.app import ManagedServer
from server.interceptors import ErrorInterceptor
from server.kserve import KServeService
from server.metrics import ServerMetrics
from server.metrics_protocol import NULL_METRICS
from server.runtime.factory import RuntimeSettings, backend_for
from server.scheduler import Scheduler
from server.served_model import ServedModel
from server.service import DetectorService
from tests.server.conftest import (
    Running,
    jpeg,
    lockstep_with_a_slow_decode,
    request,
    stalled_reader_channel,
    wait_for,
)

TRITONCLIENT = "tritonclient[grpc]==2.73.0"
MODEL = "tiny"  # tests/tiny_model.py's manifest name
CLASSES = ("car", "truck", "bus", "pedestrian", "cyclist", "traffic_light", "traffic_sign")


# -- the server ---------------------------------------------------------------------------------


def start_with_kserve(manifest_path: Path, served_models: list[ServedModel] | None = None) -> Running:
    """The native Detector and the KServe service on one server, as create_server will wire them
    once it has a ``kserve`` setting; then this becomes ``serve(kserve=True)``.
    ``served_models``: the served model is appended; KServe serves its last one (a hot swap)."""
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry, cameras=None, process=False, gpu=False)
    manifest = load_manifest(manifest_path)
    pipeline = FramePipeline.from_manifest(manifest)
    backend, variant = backend_for(manifest, "", RuntimeSettings(threads=1), preference=("onnxruntime-cpu",))
    pipeline.bind_outputs(backend.outputs)
    max_batch = max(1, min(8, backend.max_batch))
    scheduler = Scheduler(backend.infer, max_batch, 0.004, 2, 64, metrics, to_batch=pipeline.to_batch)
    ready, draining = threading.Event(), threading.Event()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         interceptors=[ErrorInterceptor(metrics), ErrorInterceptor(metrics, prefix="/inference.")])
    native = DetectorService(pipeline, metrics, 32, frozenset(), ready=ready.is_set, draining=draining.is_set)
    pb_grpc.add_DetectorServicer_to_server(native, server)
    kserve = KServeService(metrics, frozenset(), ready=ready.is_set, draining=draining.is_set)
    kserve.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    served = ServedModel(str(manifest_path), manifest, variant, backend, pipeline, max_batch)
    # Both services prepare frames for the one served model, as with create_server's ModelHost.
    native.attach(scheduler, convert.model_info(manifest, variant, backend.name, max_batch),
                  SimpleNamespace(current=served))
    models = [] if served_models is None else served_models
    models.append(served)
    kserve.attach(scheduler, lambda: models[-1])
    scheduler.start()
    ready.set()
    managed = ManagedServer(server, port, scheduler, backend, health.HealthServicer(), metrics,
                            ready=ready, draining=draining)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return Running(managed, port, registry, channel, pb_grpc.DetectorStub(channel))


@pytest.fixture
def run(serve: Any) -> Running:
    """A real server from create_server with the KServe front door on."""
    started: Running = serve(kserve=True)
    return started


# -- the stock client, in its own venv ----------------------------------------------------------


@pytest.fixture(scope="session")
def triton_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv's interpreter with tritonclient installed (protobuf 6 and all)."""
    venv = tmp_path_factory.mktemp("tritonclient") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--disable-pip-version-check",
         TRITONCLIENT],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, f"pip install {TRITONCLIENT} failed:\n{done.stdout}\n{done.stderr}"
    return python


def _client_main() -> None:
    """Run the calls read from stdin with tritonclient; print one JSON result per call.
    Runs in the tritonclient venv (sent as source): it imports nothing of the project."""
    import base64
    import importlib
    import json
    import sys

    import numpy as np

    grpcclient = importlib.import_module("tritonclient.grpc")
    utils = importlib.import_module("tritonclient.utils")
    job = json.load(sys.stdin)
    client = grpcclient.InferenceServerClient(job["url"])

    def tensors(call: dict[str, Any]) -> Any:
        inputs = []
        for spec in call["inputs"]:
            tensor = grpcclient.InferInput(spec["name"], spec["shape"], spec["datatype"])
            if spec["datatype"] == "BYTES":
                elements = [base64.b64decode(e) for e in spec["elements"]]
                tensor.set_data_from_numpy(np.array(elements, dtype=np.object_).reshape(spec["shape"]))
            else:
                raw = base64.b64decode(spec["raw"])
                tensor.set_data_from_numpy(np.frombuffer(raw, spec["dtype"]).reshape(spec["shape"]))
            inputs.append(tensor)
        outputs = [grpcclient.InferRequestedOutput(n) for n in call["outputs"]] if call.get("outputs") else None
        return inputs, outputs

    def decoded(result: Any) -> Any:
        response = result.get_response(as_json=True)
        arrays = {}
        for out in response.get("outputs", []):
            array = result.as_numpy(out["name"])
            arrays[out["name"]] = {"dtype": array.dtype.str, "shape": list(array.shape),
                                   "raw": base64.b64encode(array.tobytes()).decode()}
        return {"response": response, "arrays": arrays}

    def infer(call: dict[str, Any]) -> Any:
        inputs, outputs = tensors(call)
        return decoded(client.infer(call["model"], inputs, model_version=call.get("version", ""), outputs=outputs,
                                    request_id=call.get("id", ""), parameters=call.get("parameters") or None,
                                    timeout=call.get("timeout")))

    def stream(call: dict[str, Any]) -> Any:
        """Every call of ``call["calls"]`` sent on one ModelStreamInfer stream before any answer
        is read; their answers (or errors), in the order they came."""
        import queue

        answers: Any = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            for c in call["calls"]:
                inputs, outputs = tensors(c)
                client.async_stream_infer(c["model"], inputs, model_version=c.get("version", ""), outputs=outputs,
                                          request_id=c.get("id", ""), parameters=c.get("parameters") or None,
                                          enable_empty_final_response=c.get("final", False))
            out = []
            for _ in call["calls"]:
                result, error = answers.get(timeout=60)
                out.append({"message": error.message()} if error is not None else {"value": decoded(result)})
            return out
        finally:
            client.stop_stream()

    ops = {
        "server_live": lambda c: client.is_server_live(),
        "server_ready": lambda c: client.is_server_ready(),
        "model_ready": lambda c: client.is_model_ready(c["model"], c.get("version", "")),
        "server_metadata": lambda c: client.get_server_metadata(as_json=True),
        "model_metadata": lambda c: client.get_model_metadata(c["model"], c.get("version", ""), as_json=True),
        "model_config": lambda c: client.get_model_config(c["model"], as_json=True),
        "statistics": lambda c: client.get_inference_statistics(c["model"], c.get("version", ""), as_json=True),
        "infer": infer,
        "stream": stream,
    }
    results = []
    for call in job["calls"]:
        try:
            results.append({"value": ops[call["op"]](call)})
        except utils.InferenceServerException as exc:
            results.append({"status": exc.status(), "message": exc.message()})
    json.dump(results, sys.stdout)


_CLIENT_PROGRAM = inspect.getsource(_client_main) + "\n_client_main()\n"


def triton(python: Path, address: str, *calls: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``calls`` with tritonclient against ``address``, in one subprocess."""
    header = "from __future__ import annotations\nfrom typing import Any\n"
    done = subprocess.run([str(python), "-c", header + _CLIENT_PROGRAM], input=json.dumps(
        {"url": address, "calls": list(calls)}), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


def infer_call(images: list[bytes] | None = None, pixels: np.ndarray | None = None, model: str = MODEL,
               **extra: Any) -> dict[str, Any]:
    """An ``infer`` call of encoded images (BYTES [B]) or raw BGR pixels (UINT8, HWC)."""
    if pixels is not None:
        spec = {"name": "IMAGE", "datatype": "UINT8", "shape": list(pixels.shape), "dtype": "|u1",
                "raw": base64.b64encode(pixels.tobytes()).decode()}
    else:
        assert images is not None
        spec = {"name": "IMAGE", "datatype": "BYTES", "shape": [len(images)],
                "elements": [base64.b64encode(i).decode() for i in images]}
    return {"op": "infer", "model": model, "inputs": [spec], **extra}


def output(result: dict[str, Any], name: str) -> np.ndarray:
    a = result["value"]["arrays"][name]
    return np.frombuffer(base64.b64decode(a["raw"]), a["dtype"]).reshape(a["shape"])


def native_rows(run: Running, data: bytes | None = None, raw: np.ndarray | None = None,
                options: pb.DetectOptions | None = None) -> np.ndarray:
    """(N, 6) rows x1 y1 x2 y2 score class of the native Detect for the same frame."""
    req = request("native", 1, data)
    if raw is not None:
        h, w, _ = raw.shape
        req.frame.raw.CopyFrom(pb.RawImage(width=w, height=h, format=pb.PIXEL_FORMAT_BGR8, data=raw.tobytes()))
    if options is not None:
        req.options.CopyFrom(options)
    resp = run.stub.Detect(req, timeout=10)
    assert resp.status == pb.FRAME_STATUS_OK, resp.message
    return np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2, d.score, d.class_id] for d in resp.detections],
                    np.float32).reshape(-1, 6)


def split(result: dict[str, Any]) -> list[np.ndarray]:
    """DETECTIONS cut into one (N_i, 6) array per frame by NUM_DETECTIONS."""
    rows, counts = output(result, "DETECTIONS"), output(result, "NUM_DETECTIONS")
    assert rows.shape == (int(counts.sum()), 6)
    return np.split(rows, np.cumsum(counts)[:-1])


def counter(run: Running, name: str, **labels: str) -> float:
    value = run.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- tests --------------------------------------------------------------------------------------


def test_health_and_metadata(run, triton_python):
    live, ready, model_ready, other_ready, server_md, model_md, unknown_md, config = triton(
        triton_python, run.address,
        {"op": "server_live"}, {"op": "server_ready"}, {"op": "model_ready", "model": MODEL},
        {"op": "model_ready", "model": "nope"}, {"op": "server_metadata"}, {"op": "model_metadata", "model": MODEL},
        {"op": "model_metadata", "model": "nope"}, {"op": "model_config", "model": MODEL},
    )
    assert live["value"] is True and ready["value"] is True
    assert model_ready["value"] is True and other_ready["value"] is False
    assert server_md["value"]["name"] == "perception" and server_md["value"]["version"]
    # Not "statistics", though ModelStatistics is served: perf_analyzer would then parse this
    # server's model versions ("0.0.1") as Triton's integers and stop (server.kserve.EXTENSIONS).
    assert server_md["value"]["extensions"] == ["model_configuration", "parameters"]
    md = model_md["value"]
    assert md["name"] == MODEL and md["versions"] == ["0.0.1"] and md["platform"] == "onnxruntime-cpu"
    assert md["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": ["-1"]}]
    assert md["outputs"] == [{"name": "DETECTIONS", "datatype": "FP32", "shape": ["-1", "6"]},
                             {"name": "NUM_DETECTIONS", "datatype": "INT32", "shape": ["-1"]}]
    assert unknown_md["status"] == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in unknown_md["message"]
    # Triton's ModelConfig (stock get_model_config, perf_analyzer): no implicit batch dimension.
    cfg = config["value"]["config"]
    assert cfg["name"] == MODEL and cfg["platform"] == "onnxruntime-cpu" and cfg["backend"] == "perception"
    assert cfg.get("max_batch_size", 0) == 0
    assert cfg["input"] == [{"name": "IMAGE", "data_type": "TYPE_STRING", "dims": ["-1"]}]
    assert cfg["output"] == [{"name": "DETECTIONS", "data_type": "TYPE_FP32", "dims": ["-1", "6"]},
                             {"name": "NUM_DETECTIONS", "data_type": "TYPE_INT32", "dims": ["-1"]}]


def test_one_jpeg_gives_the_native_detections(run, triton_python):
    data = jpeg(320, 200, seed=3)
    (result,) = triton(triton_python, run.address, infer_call([data], id="req-7"))
    response = result["value"]["response"]
    assert response["model_name"] == MODEL and response["model_version"] == "0.0.1" and response["id"] == "req-7"
    rows, counts = output(result, "DETECTIONS"), output(result, "NUM_DETECTIONS")
    assert rows.dtype == np.float32 and counts.dtype == np.int32
    expected = native_rows(run, data)
    assert len(expected) > 0  # the tiny model's objectness leans positive
    assert counts.tolist() == [len(expected)]
    np.testing.assert_allclose(rows, expected, atol=1e-4)
    assert np.all((rows[:, 2] <= 320) & (rows[:, 3] <= 200))  # source pixels
    assert counter(run, "perception_frames_answered_total", camera="unnamed") == 1


def test_a_batch_of_three_frames_from_three_cameras(run, triton_python):
    frames = [jpeg(320, 200, seed=1), jpeg(160, 120, seed=2), jpeg(640, 360, seed=4)]
    (result,) = triton(triton_python, run.address,
                       infer_call(frames, parameters={"camera_id": "front,rear,left"}))
    per_frame = split(result)
    assert len(per_frame) == 3
    for data, rows in zip(frames, per_frame, strict=True):
        np.testing.assert_allclose(rows, native_rows(run, data), atol=1e-4)
    for camera in ("front", "rear", "left"):
        assert counter(run, "perception_frames_received_total", camera=camera) == 1
        assert counter(run, "perception_frames_answered_total", camera=camera) == 1


def test_raw_bgr_pixels_hwc(run, triton_python):
    pixels = cv2.imdecode(np.frombuffer(jpeg(200, 150, seed=5), np.uint8), cv2.IMREAD_COLOR)
    assert pixels is not None
    single, batched = triton(triton_python, run.address, infer_call(pixels=pixels),
                             infer_call(pixels=np.stack([pixels, pixels[::-1].copy()])))
    expected = native_rows(run, raw=pixels)
    np.testing.assert_allclose(output(single, "DETECTIONS"), expected, atol=1e-4)
    first, flipped = split(batched)
    np.testing.assert_allclose(first, expected, atol=1e-4)
    np.testing.assert_allclose(flipped, native_rows(run, raw=pixels[::-1].copy()), atol=1e-4)


def test_request_parameters_match_the_native_options(run, triton_python):
    data = jpeg(256, 192, seed=1)  # the tiny model's aspect: 20 boxes, overlapping ones of one class
    # A threshold between the default answer's scores, so that it has something to remove.
    scores = np.sort(native_rows(run, data)[:, 4])
    assert len(scores) >= 2 and scores[0] < scores[-1]
    threshold = round(float(scores[len(scores) // 2]), 4)
    cases = [  # (KServe parameters, the same as native options)
        ({"score_threshold": threshold}, pb.DetectOptions(score_threshold=threshold)),
        ({"iou_threshold": 0.1}, pb.DetectOptions(iou_threshold=0.1)),
        ({"max_detections": 3}, pb.DetectOptions(max_detections=3)),
        ({"class_filter": "0,2"}, pb.DetectOptions(class_filter=[0, 2])),
    ]
    default, *filtered, counts_only, unknown = triton(
        triton_python, run.address,
        infer_call([data]),
        *[infer_call([data], parameters=params) for params, _ in cases],
        infer_call([data], outputs=["NUM_DETECTIONS"]),
        infer_call([data], parameters={"score_thresh": 0.5}),
    )
    everything = output(default, "DETECTIONS")
    assert 1.0 in everything[:, 5]  # so that the class filter has something to remove
    for (params, options), result in zip(cases, filtered, strict=True):
        rows = output(result, "DETECTIONS")
        np.testing.assert_allclose(rows, native_rows(run, data, options=options), atol=1e-4, err_msg=str(params))
        assert not np.array_equal(rows, everything), f"{params} changed nothing"
    assert list(counts_only["value"]["arrays"]) == ["NUM_DETECTIONS"]
    assert output(counts_only, "NUM_DETECTIONS").tolist() == [len(everything)]
    assert unknown["status"] == "StatusCode.INVALID_ARGUMENT" and "score_thresh" in unknown["message"]


def test_corrupt_jpeg_is_invalid_argument_and_the_server_goes_on(run, triton_python):
    bad, unknown_model, good = triton(
        triton_python, run.address,
        infer_call([jpeg()[:200]]), infer_call([jpeg()], model="nope"), infer_call([jpeg()]),
    )
    assert bad["status"] == "StatusCode.INVALID_ARGUMENT" and "truncated" in bad["message"]
    assert unknown_model["status"] == "StatusCode.NOT_FOUND"  # as Triton answers an unknown model
    assert "unknown model 'nope'" in unknown_model["message"]
    assert "value" in good and output(good, "NUM_DETECTIONS").shape == (1,)
    assert counter(run, "perception_frames_dropped_total", camera="unnamed", reason="invalid") == 1
    assert counter(run, "perception_grpc_errors_total", method="ModelInfer", code="INVALID_ARGUMENT") == 1
    assert counter(run, "perception_grpc_errors_total", method="ModelInfer", code="NOT_FOUND") == 1


def test_a_stream_answers_in_order_and_goes_on_after_bad_requests(run, triton_python):
    """ModelStreamInfer, Triton's streaming extension (tritonclient's start_stream and
    async_stream_infer): every request answered in the order sent, as ModelInfer would answer
    it; a bad one gets an error on the stream, which goes on."""
    frames = [jpeg(seed=k) for k in range(3)]
    calls = [infer_call([frames[0]], id="a"), infer_call([frames[0][:200]], id="b"), infer_call([frames[1]], id="c"),
             infer_call([frames[2]], model="nope", id="d"), infer_call(frames[1:], id="e")]
    [result] = triton(triton_python, run.address, {"op": "stream", "calls": calls})
    answers = result["value"]
    assert [a["value"]["response"].get("id") if "value" in a else None for a in answers] == ["a", None, "c", None, "e"]
    assert "truncated" in answers[1]["message"] and "unknown model 'nope'" in answers[3]["message"]
    for answer, data in ((answers[0], frames[0]), (answers[2], frames[1])):
        np.testing.assert_allclose(output(answer, "DETECTIONS"), native_rows(run, data), atol=1e-4)
    for rows, data in zip(split(answers[4]), frames[1:], strict=True):
        np.testing.assert_allclose(rows, native_rows(run, data), atol=1e-4)
    assert counter(run, "perception_grpc_errors_total", method="ModelStreamInfer", code="INVALID_ARGUMENT") == 1
    assert counter(run, "perception_grpc_errors_total", method="ModelStreamInfer", code="NOT_FOUND") == 1
    assert counter(run, "perception_frames_dropped_total", camera="unnamed", reason="invalid") == 1
    end = time.monotonic() + 5  # the call's end reaches the server a moment after the client's
    while counter(run, "perception_streams_in_flight") and time.monotonic() < end:
        time.sleep(0.05)
    assert counter(run, "perception_streams_in_flight") == 0, "the stream's slot is given back when it ends"


def test_the_final_response_flag_perf_analyzer_and_stream_clients_send_is_taken(run, triton_python):
    """perf_analyzer sends Triton's reserved ``triton_enable_empty_final_response`` on every request
    (tritonclient's async_stream_infer when asked). It was refused as an unknown parameter, so stock
    perf_analyzer stopped at its first request. Taken now as Triton takes it: a stream's answer to a
    request that sets it says it is the request's last (``triton_final_response``). Other
    ``triton_`` keys are Triton's reserved ones, refused as Triton refuses them."""
    data = jpeg(seed=2)
    infer = method(run.channel, "ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse)

    def req(**parameters: kpb.InferParameter) -> kpb.ModelInferRequest:
        return kpb.ModelInferRequest(model_name=MODEL, inputs=[_bytes_input([1])], raw_input_contents=[_prefixed(data)],
                                     parameters=parameters)

    resp = infer(req(triton_enable_empty_final_response=kpb.InferParameter(bool_param=True)), timeout=10)
    rows = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(-1, 6)
    np.testing.assert_allclose(rows, native_rows(run, data), atol=1e-4)
    assert "triton_final_response" not in resp.parameters  # a unary call's one answer: no stream to mark
    for parameters, needle in (
        ({"triton_enable_empty_final_response": kpb.InferParameter(string_param="yes")}, "must be a bool"),
        ({"triton_other": kpb.InferParameter(bool_param=True)}, "reserved"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            infer(req(**parameters), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in (err.value.details() or "")

    calls = [infer_call([data], id="a", final=True), infer_call([data], id="b"), infer_call([data], id="c", final=True)]
    [result] = triton(triton_python, run.address, {"op": "stream", "calls": calls})
    marks = [a["value"]["response"].get("parameters", {}).get("triton_final_response") for a in result["value"]]
    assert marks == [{"bool_param": True}, None, {"bool_param": True}]
    for answer in result["value"]:
        np.testing.assert_allclose(output(answer, "DETECTIONS"), rows, atol=1e-4)


def _stats(result: dict[str, Any]) -> dict[str, Any]:
    (stats,) = result["value"]["model_stats"]
    return stats


def _count(stats: dict[str, Any], *path: str) -> int:
    """A counter of a ModelStatistics answer as JSON (absent: 0, as protobuf leaves a zero out)."""
    value: Any = stats
    for key in path:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    return int(value or 0)


def test_model_statistics_count_what_the_model_served(run, triton_python):
    """Triton's ModelStatistics (tritonclient's get_inference_statistics): the served version's
    running sums, frames as requests. A frame the engine failed on is a failure; one refused
    before its decode (a corrupt JPEG) never reached the model and is not counted."""
    from tests.server.test_stream_faults import _fail_first_batch

    (before,) = triton(triton_python, run.address, {"op": "statistics", "model": MODEL})
    start = _stats(before)
    assert start["name"] == MODEL and start["version"] == "0.0.1"
    infer = method(run.channel, "ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse)
    _fail_first_batch(run)
    for data, code in ((jpeg(seed=4), grpc.StatusCode.INTERNAL), (jpeg()[:200], grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as err:
            infer(kpb.ModelInferRequest(model_name=MODEL, inputs=[_bytes_input([1])],
                                        raw_input_contents=[_prefixed(data)]), timeout=10)
        assert err.value.code() == code
    _, _, after, everything, by_version, unknown, old = triton(
        triton_python, run.address,
        infer_call([jpeg(seed=1), jpeg(seed=2)]), infer_call([jpeg(seed=3)]),
        {"op": "statistics", "model": MODEL}, {"op": "statistics", "model": ""},
        {"op": "statistics", "model": MODEL, "version": "0.0.1"}, {"op": "statistics", "model": "nope"},
        {"op": "statistics", "model": MODEL, "version": "9"},
    )
    stats = _stats(after)
    assert everything["value"] == after["value"] == by_version["value"]

    def grew(*path: str) -> int:
        return _count(stats, *path) - _count(start, *path)

    assert grew("inference_count") == 3
    assert grew("inference_stats", "success", "count") == 3 and grew("inference_stats", "fail", "count") == 1
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert grew("inference_stats", stage, "count") == 3, stage
    for stage in ("success", "compute_input", "compute_infer", "compute_output"):
        assert grew("inference_stats", stage, "ns") > 0, stage
    # The frames' time in the server covers their stages.
    stages = sum(grew("inference_stats", s, "ns")
                 for s in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert grew("inference_stats", "success", "ns") >= stages * 0.9
    runs, runs_before = stats["batch_stats"], {b["batch_size"]: b for b in start.get("batch_stats", [])}

    def ran(b: dict[str, Any]) -> int:
        earlier = runs_before.get(b["batch_size"], {})
        return _count(b, "compute_infer", "count") - _count(earlier, "compute_infer", "count")

    # The failed run is no execution; the three frames ran in 2 or 3 runs.
    assert sum(ran(b) for b in runs) == grew("execution_count") in (2, 3)
    assert sum(int(b["batch_size"]) * ran(b) for b in runs) == 3
    assert abs(int(stats["last_inference"]) / 1000 - time.time()) < 60
    assert unknown["status"] == "StatusCode.NOT_FOUND" and old["status"] == "StatusCode.NOT_FOUND"


def test_a_stream_cancelled_with_frames_decoded_counts_them_failed(serve, monkeypatch):
    """A StreamDetect call that ends with frames decoded and queued: they count as failures in
    the model's statistics, as a Detect call's and a KServe request's do (they were not
    counted at all)."""
    from tests.server.test_service import _hold_the_engine

    run = serve(kserve=True, inference_workers=1)
    stats = run.server.models.current.stats
    before = stats.snapshot().fail.count
    release = _hold_the_engine(run, monkeypatch)
    sent = threading.Event()

    def frames() -> Iterator[pb.DetectRequest]:
        yield request("front", 1, jpeg())
        sent.set()
        time.sleep(30)

    call = run.stub.StreamDetect(frames(), timeout=30)
    try:
        assert sent.wait(10)
        assert wait_for(lambda: run.server.scheduler.pending == 1, 10)  # decoded, queued behind the held run
        call.cancel()
        assert wait_for(lambda: stats.snapshot().fail.count == before + 1, 10)
    finally:
        release.set()


def test_model_statistics_go_on_across_models_of_one_version(tiny_manifest):
    """Triton's clients take rates from two snapshots of one name and version: a degrade step
    (another variant of the version), a reload or a rollback loads another model object of the
    same version, and its sums started at zero (perf_analyzer subtracts unsigned: a wrap). Every
    loaded model of a version shares them; one loaded again once none is, starts anew."""
    import gc

    from server.model_stats import stats_for

    manifest = load_manifest(tiny_manifest)
    pipeline = FramePipeline.from_manifest(manifest)
    backend, variant = backend_for(manifest, "", RuntimeSettings(threads=1), preference=("onnxruntime-cpu",))
    try:
        one = ServedModel(str(tiny_manifest), manifest, variant, backend, pipeline, 1)
        one.stats.executed(1, 0.01)
        two = ServedModel(str(tiny_manifest), manifest, variant, backend, pipeline, 1)
        assert two.stats is one.stats and two.stats.snapshot().execution_count >= 1
        assert stats_for(manifest.name, "another version") is not one.stats
    finally:
        backend.deactivate()
    gone = stats_for("a model no test loads", "1")
    gone.executed(2, 0.01)
    assert stats_for("a model no test loads", "1") is gone
    del gone
    gc.collect()
    assert stats_for("a model no test loads", "1").snapshot().execution_count == 0


@pytest.mark.parametrize("streaming", [False, True])
def test_stock_perf_analyzer_measures_the_front_door(run, tmp_path, streaming):
    """Triton's benchmark tool, the binary NVIDIA ships (bench/bench_perf_analyzer.py fetches it
    from PyPI), against the front door: it stopped at its first request until the server took
    the reserved parameter it sends with every one."""
    from bench.bench_perf_analyzer import input_data, perf_analyzer

    try:
        binary, env = perf_analyzer()
    except RuntimeError as exc:
        pytest.skip(f"perf_analyzer cannot run here: {exc} (make test installs libb64 where it can)")
    data = input_data([jpeg(seed=k) for k in range(3)], tmp_path / "input.json")
    out = tmp_path / "out.csv"
    done = subprocess.run(
        [str(binary), "-m", MODEL, "-i", "grpc", "-u", run.address, "--input-data", str(data), "--concurrency-range",
         "2", "--measurement-mode", "count_windows", "--measurement-request-count", "20",
         "--stability-percentage", "999", "--max-trials", "3", "-f", str(out), *(["--streaming"] if streaming else [])],
        capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    text = out.read_text()
    rows = text.splitlines()
    assert len(rows) == 2 and float(rows[1].split(",")[1]) > 0, text  # Concurrency,Inferences/Second,...
    assert counter(run, "perception_frames_answered_total", camera="unnamed") >= 60  # 3 windows of 20
    assert counter(run, "perception_frames_dropped_total", camera="unnamed", reason="invalid") == 0


def _stream_infer(channel: grpc.Channel, response: Any = bytes) -> Any:
    """ModelStreamInfer on ``channel``, over a plain gRPC channel."""
    return channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                 request_serializer=kpb.ModelInferRequest.SerializeToString,
                                 response_deserializer=response)


def _quiet(release: threading.Event, wait_s: float) -> Iterator[kpb.ModelInferRequest]:
    """A stream's requests: none, until ``release`` is set (or ``wait_s`` passed)."""
    release.wait(wait_s)
    return
    yield


def test_a_quiet_stream_is_ended_and_a_stream_takes_a_slot(serve):
    """A ModelStreamInfer stream holds one of the server's stream slots, like a StreamDetect,
    and one that sends nothing for the idle timeout is ended UNAVAILABLE (to reconnect)."""
    run = serve(kserve=True, stream_idle_timeout_s=1.5, max_streams=1)  # the second stream comes well within it
    stream = _stream_infer(run.channel)
    release = threading.Event()
    calls = stream(_quiet(release, 10), timeout=10)
    time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as second:  # the one slot is taken
        list(stream(iter([]), timeout=5))
    assert second.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as first:
        list(calls)
    release.set()
    assert first.value.code() == grpc.StatusCode.UNAVAILABLE and "sent no request" in (first.value.details() or "")
    assert time.monotonic() - t0 < 5


def test_a_quiet_stream_ends_at_once_when_the_server_drains(serve):
    """A drain ends a ModelStreamInfer stream with nothing in flight at once (UNAVAILABLE,
    "shutting down": the client reconnects to another instance), not at the end of the grace
    period, which the shutdown would otherwise wait out."""
    run = serve(kserve=True)
    stream = _stream_infer(run.channel)
    release = threading.Event()
    calls = stream(_quiet(release, 20), timeout=20)
    time.sleep(0.3)
    t0 = time.monotonic()
    done: list[bool] = []
    stopper = threading.Thread(target=lambda: done.append(run.server.shutdown(10.0)))
    stopper.start()
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(calls)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in (info.value.details() or "")
        stopper.join(15)
    finally:
        release.set()
    assert done == [True] and time.monotonic() - t0 < 5, "the shutdown did not wait out its grace period"


def test_a_client_cancelling_a_stream_is_no_error(run):
    """A client that cancels its stream with requests in flight: their frames leave the queues,
    the stream's slot is given back, and no error is counted (a cancel is the client's choice)."""
    request = kpb.ModelInferRequest(model_name=MODEL, inputs=[_bytes_input([1])],
                                    raw_input_contents=[_prefixed(jpeg())])
    stream = _stream_infer(run.channel)
    for _ in range(3):
        calls = stream(iter([request] * 8), timeout=20)
        next(calls)  # one answer, and the rest in flight
        calls.cancel()
    end = time.monotonic() + 5
    while counter(run, "perception_streams_in_flight") and time.monotonic() < end:
        time.sleep(0.05)
    assert counter(run, "perception_streams_in_flight") == 0
    errors = [s for m in run.registry.collect() if m.name == "perception_grpc_errors" for s in m.samples
              if s.labels.get("method") == "ModelStreamInfer" and s.value]
    assert errors == []


def test_a_stream_of_garbage_is_read_slower(serve):
    """Requests that cannot be served slow a ModelStreamInfer stream's reading, as they slow a
    StreamDetect stream's: a client flooding garbage waits in flow control."""
    garbage = kpb.ModelInferRequest(model_name=MODEL, inputs=[_bytes_input([1])],
                                    raw_input_contents=[_prefixed(b"\xff\xd8 not an image " + bytes(64))])

    def elapsed(run: Running, n: int) -> tuple[float, list[Any]]:
        stream = _stream_infer(run.channel, mcpb.ModelStreamInferResponse.FromString)
        t0 = time.perf_counter()
        out = list(stream(iter([garbage] * n), timeout=60))
        return time.perf_counter() - t0, out

    fast, answers = elapsed(serve(kserve=True, invalid_backoff_max_s=0), 20)
    assert len(answers) == 20 and all("JPEG" in a.error_message or "decode" in a.error_message for a in answers), \
        answers[0].error_message
    slow, answers = elapsed(serve(kserve=True, invalid_backoff_max_s=0.2), 20)
    assert len(answers) == 20
    assert fast < 1.0 < slow, (fast, slow)


def test_a_client_that_stops_reading_loses_its_stream_after_the_idle_timeout(serve):
    """Once the client's HTTP/2 window is full, the stream's send blocks inside gRPC, where its
    idle check never runs: the stream's slot, its threads and its queued frames were held until
    the connection died. The send watchdog cancels the call when no answer could be sent for
    the idle timeout, as StreamDetect's does."""
    run = serve(kserve=True, stream_idle_timeout_s=1.0, invalid_backoff_max_s=0)
    pixels = np.random.default_rng(0).integers(0, 255, 240 * 320 * 3, dtype=np.uint8).tobytes()
    big_answers = {"score_threshold": kpb.InferParameter(double_param=0.01),
                   "max_detections": kpb.InferParameter(int64_param=100)}
    frame = kpb.ModelInferRequest(model_name=MODEL, inputs=[_bytes_input([240, 320, 3], "UINT8")],
                                  raw_input_contents=[pixels], parameters=big_answers)
    stop = threading.Event()

    def requests() -> Iterator[kpb.ModelInferRequest]:
        for _ in range(300):
            if stop.is_set():
                return
            yield frame
        stop.wait(30)

    streams = run.server.limits.streams
    earlier = {t for t in threading.enumerate() if t.name.startswith("kserve-stream-")}  # other tests' streams
    channel = stalled_reader_channel(run.address)
    call = _stream_infer(channel)(requests(), timeout=30)  # never read
    try:
        assert wait_for(lambda: streams.open_streams == 1, 5)
        assert wait_for(lambda: streams.open_streams == 0, 5), "the stream still holds its slot"
        assert wait_for(lambda: not [t for t in threading.enumerate()
                                      if t.name.startswith("kserve-stream-") and t not in earlier], 5)
        infer = method(run.channel, "ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse)
        assert infer(frame, timeout=10).outputs  # the server goes on
    finally:
        stop.set()
        call.cancel()
        channel.close()


def test_a_request_taken_in_slowly_does_not_end_its_stream_as_idle(serve):
    """While the reader takes a request in (waiting for a decode slot, decoding, inferring it
    on its own thread) nothing waits to be answered: the stream counted that time as quiet, and
    a lockstep client whose request waited longer than the idle timeout for a decode slot lost
    it, the stream ended "sent no request"."""
    run = serve(kserve=True, stream_idle_timeout_s=1.0, decode_threads=1)
    requests, turn, held = lockstep_with_a_slow_decode(run.server.limits, lambda i: kpb.ModelInferRequest(
        model_name=MODEL, id=str(i), inputs=[_bytes_input([1])], raw_input_contents=[_prefixed(jpeg(seed=i))]))
    answered = []
    for answer in _stream_infer(run.channel, mcpb.ModelStreamInferResponse.FromString)(requests, timeout=20):
        assert not answer.error_message, answer.error_message
        answered.append(kpb.ModelInferResponse.FromString(answer.infer_response).id)
        turn.release()
    assert answered == ["0", "1", "2", "3"] and held and held[0].is_set()


# -- requests no stock client sends, over a plain channel ---------------------------------------


def method(channel: grpc.Channel, name: str, request_type: Any, response_type: Any) -> Any:
    """A callable of ``inference.GRPCInferenceService/<name>`` on ``channel``."""
    return channel.unary_unary(f"/inference.GRPCInferenceService/{name}",
                               request_serializer=request_type.SerializeToString,
                               response_deserializer=response_type.FromString)


def _plain_infer(run: Running, req: kpb.ModelInferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        method(run.channel, "ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse)(req, timeout=10)
    return info.value


def _bytes_input(shape: list[int], datatype: str = "BYTES") -> kpb.ModelInferRequest.InferInputTensor:
    return kpb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype=datatype, shape=shape)


def _prefixed(*elements: bytes) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


@pytest.mark.parametrize("inputs, raw, needle", [
    ([_bytes_input([1])], [(1000).to_bytes(4, "little") + b"xx"], "says 1000 bytes"),
    ([_bytes_input([2])], [_prefixed(b"ab")], "end before element 1"),
    ([_bytes_input([1])], [_prefixed(b"ab") + b"junk"], "past its 1 elements"),
    ([_bytes_input([9])], [_prefixed(*[b"x"] * 9)], "at most 8"),
    ([_bytes_input([0])], [b""], "dimension < 1"),
    ([_bytes_input([1], "FP32")], [b"\0" * 4], "BYTES (encoded JPEG/PNG) or UINT8"),
    ([_bytes_input([4, 4, 3], "UINT8")], [b"\0" * 47], "needs 48 bytes"),
    ([_bytes_input([4, 4, 4], "UINT8")], [b"\0" * 64], "[H, W, 3]"),
    ([_bytes_input([1]), _bytes_input([1])], [b"", b""], "exactly one input"),
    ([_bytes_input([1])], [], "needs 1 bytes_contents"),
])
def test_malformed_tensors_are_invalid_argument(run, inputs, raw, needle):
    err = _plain_infer(run, kpb.ModelInferRequest(model_name=MODEL, inputs=inputs, raw_input_contents=raw))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.details() or "")


@pytest.mark.parametrize("stage", ["inference", "post-processing"])
def test_a_request_the_server_fails_on_is_internal(serve, stage):
    """A frame whose inference or post-processing failed fails its ModelInfer INTERNAL, as a
    Detect call does; a post-processing failure used to come back RESOURCE_EXHAUSTED ("retry
    later"), as if the server were only busy."""
    from tests.server.test_stream_faults import _fail_first_batch, _fail_first_finish

    run = serve(kserve=True)
    (_fail_first_batch if stage == "inference" else _fail_first_finish)(run)
    infer = method(run.channel, "ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse)
    req = kpb.ModelInferRequest(model_name=MODEL, inputs=[_bytes_input([1])], raw_input_contents=[_prefixed(jpeg())])
    with pytest.raises(grpc.RpcError) as err:
        infer(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()
    assert counter(run, "perception_grpc_errors_total", method="ModelInfer", code="INTERNAL") == 1
    assert len(infer(req, timeout=10).outputs) == 2  # the next request is served


def test_a_request_whose_call_ends_first_is_counted_cancelled(serve, monkeypatch):
    """A ModelInfer call that ends (here its deadline) while its frame waits behind a busy engine:
    the frame was counted received and never answered nor dropped."""
    from tests.server.test_service import _hold_the_engine

    run = serve(kserve=True, inference_workers=1)
    release = _hold_the_engine(run, monkeypatch)
    infer = method(run.channel, "ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse)
    req = kpb.ModelInferRequest(model_name=MODEL, inputs=[_bytes_input([1])], raw_input_contents=[_prefixed(jpeg())],
                                parameters={"camera_id": kpb.InferParameter(string_param="late")})
    try:
        with pytest.raises(grpc.RpcError) as err:
            infer(req, timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_for(lambda: counter(run, "perception_frames_dropped_total", camera="late", reason="cancelled") == 1)
    finally:
        release.set()
    assert counter(run, "perception_frames_received_total", camera="late") == 1
    assert not counter(run, "perception_frames_answered_total", camera="late")


def test_a_stream_cancelled_while_its_request_waits_counts_its_frame_dropped_once(serve, monkeypatch):
    """The stream's cancel and its handler's wait for the engine both cancelled the request at
    the head of the stream, and each counted its frame dropped: 2 for 1 received."""
    from tests.server.test_service import _hold_the_engine

    run = serve(kserve=True, inference_workers=1)
    release = _hold_the_engine(run, monkeypatch)
    req = kpb.ModelInferRequest(model_name=MODEL, inputs=[_bytes_input([1])], raw_input_contents=[_prefixed(jpeg())],
                                parameters={"camera_id": kpb.InferParameter(string_param="gone")})
    more = threading.Event()

    def requests():
        yield req
        more.wait(30)

    try:
        calls = _stream_infer(run.channel)(requests(), timeout=30)
        assert wait_for(lambda: counter(run, "perception_frames_received_total", camera="gone") == 1)
        time.sleep(0.3)  # the handler waits for the frame
        calls.cancel()
        assert wait_for(lambda: counter(run, "perception_frames_dropped_total", camera="gone", reason="cancelled"))
        time.sleep(1.0)  # the handler's next look at the frame (every 0.25 s)
    finally:
        release.set()
        more.set()
    time.sleep(0.3)
    assert counter(run, "perception_frames_dropped_total", camera="gone", reason="cancelled") == 1
    assert not counter(run, "perception_frames_answered_total", camera="gone")


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The camera id of every frame the server decodes from now on (the real decode runs)."""
    decodes: list[str] = []
    prepare = FramePipeline.prepare

    def counted(self: FramePipeline, frame: Any, *args: Any) -> Any:
        decodes.append(frame.camera_id)
        return prepare(self, frame, *args)

    monkeypatch.setattr(FramePipeline, "prepare", counted)
    return decodes


@pytest.mark.parametrize("door", ["ModelInfer", "Detect", "StreamDetect"])
def test_over_capacity_a_frame_is_refused_before_it_is_decoded(serve, monkeypatch, door):
    """A server at max_pending refuses a frame before decoding it: a KServe request of 8 frames
    decoded all 8 and was then refused (as were a Detect call's and a stream's frame)."""
    from server.scheduler import Job
    from tests.server.test_service import _hold_the_engine

    run = serve(kserve=True, inference_workers=1, max_pending=1)
    release = _hold_the_engine(run, monkeypatch)
    decodes = _count_decodes(monkeypatch)
    # The one frame max_pending allows, of a class no other frame may shed.
    run.server.scheduler.submit(Job("filler", None, lambda result: None, priority=2))
    try:
        if door == "ModelInfer":
            infer = method(run.channel, "ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse)
            req = kpb.ModelInferRequest(model_name=MODEL, inputs=[_bytes_input([8])],
                                        raw_input_contents=[_prefixed(*[jpeg(seed=k) for k in range(8)])])
            with pytest.raises(grpc.RpcError) as err:
                infer(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "over capacity" in (err.value.details() or "")
        elif door == "Detect":
            with pytest.raises(grpc.RpcError) as err:
                run.stub.Detect(request("front", 1, jpeg()), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        else:
            (answer,) = run.stub.StreamDetect(iter([request("front", 1, jpeg())]), timeout=10)
            assert answer.status == pb.FRAME_STATUS_OVERLOADED and "over capacity" in answer.message
    finally:
        release.set()
    assert [c for c in decodes if c != "busy"] == []
    frames = 8 if door == "ModelInfer" else 1
    camera = "unnamed" if door == "ModelInfer" else "front"
    assert counter(run, "perception_frames_dropped_total", camera=camera, reason="overloaded") == frames


def test_a_request_of_mixed_classes_over_capacity_is_refused_before_its_decodes(serve, monkeypatch):
    """A KServe request whose frames are of two camera classes, past capacity, whose later,
    lower frame has nothing to shed: refused before its decodes. Asked as its highest class, it
    was let through, both frames were decoded, and its lower frame was then refused."""
    from server.scheduler import Job
    from tests.server.test_service import _hold_the_engine

    run = serve(kserve=True, inference_workers=1, max_pending=4,
                camera_priorities=("crit=critical", "low=best_effort"))
    release = _hold_the_engine(run, monkeypatch)
    decodes = _count_decodes(monkeypatch)
    for k in range(3):  # other clients' frames of the normal class
        run.server.scheduler.submit(Job(f"filler{k}", None, lambda result: None, priority=1))
    infer = method(run.channel, "ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse)
    req = kpb.ModelInferRequest(model_name=MODEL, inputs=[_bytes_input([2])],
                                raw_input_contents=[_prefixed(jpeg(seed=1), jpeg(seed=2))],
                                parameters={"camera_id": kpb.InferParameter(string_param="crit,low")})
    try:
        with pytest.raises(grpc.RpcError) as err:
            infer(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        release.set()
    assert [c for c in decodes if c != "busy"] == []


def test_typed_contents_are_accepted(run):
    data = jpeg(160, 120, seed=8)
    tensor = _bytes_input([1])
    tensor.contents.bytes_contents.append(data)
    infer = method(run.channel, "ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse)
    resp = infer(kpb.ModelInferRequest(model_name=MODEL, inputs=[tensor]), timeout=10)
    assert [o.name for o in resp.outputs] == ["DETECTIONS", "NUM_DETECTIONS"]
    rows = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(-1, 6)
    np.testing.assert_allclose(rows, native_rows(run, data), atol=1e-4)


def test_a_request_shaped_as_the_kserve_sdk_sends_it_is_served(run):
    """The KServe SDK's InferInput sets binary_data_size on every numpy input (its default) and
    its gRPC client sends input parameters on; its RequestedOutput carries binary_data. Every
    request of that client was refused ("input parameters are not supported")."""
    data = jpeg(160, 120, seed=8)
    raw = _prefixed(data)
    tensor = _bytes_input([1])
    tensor.parameters["binary_data_size"].int64_param = len(raw)
    out = kpb.ModelInferRequest.InferRequestedOutputTensor(name="DETECTIONS")
    out.parameters["binary_data"].bool_param = True
    infer = method(run.channel, "ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse)
    resp = infer(kpb.ModelInferRequest(model_name=MODEL, inputs=[tensor], outputs=[out], raw_input_contents=[raw]),
                 timeout=10)
    rows = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(-1, 6)
    np.testing.assert_allclose(rows, native_rows(run, data), atol=1e-4)
    tensor.parameters["binary_data_size"].int64_param = len(raw) + 1  # a size that is not the contents'
    err = _plain_infer(run, kpb.ModelInferRequest(model_name=MODEL, inputs=[tensor], raw_input_contents=[raw]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents holds" in (err.details() or "")
    tensor.parameters["shared_memory_region"].string_param = "cams"  # still not served, named once
    err = _plain_infer(run, kpb.ModelInferRequest(model_name=MODEL, inputs=[tensor], raw_input_contents=[raw]))
    assert "got ['shared_memory_region']" in (err.details() or ""), err.details()


@pytest.mark.parametrize("ids, ok", [("0,2,", True), (" 1 , 3", True), ("1_0", False), ("+1", False),
                                     ("\u0663", False), ("-1", False)])
def test_class_filter_takes_ascii_ids_only(run, ids, ok):
    """int() read "1_0" as 10, "+1" as 1 and an Arabic-Indic three as 3; a list with a trailing
    comma was refused as having an entry too many."""
    req = kpb.ModelInferRequest(model_name=MODEL, inputs=[_bytes_input([1])], raw_input_contents=[_prefixed(jpeg())],
                                parameters={"class_filter": kpb.InferParameter(string_param=ids)})
    infer = method(run.channel, "ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse)
    if ok:
        infer(req, timeout=10)
    else:
        assert 'class ids like "0,2"' in (_plain_infer(run, req).details() or "")


def test_until_the_model_is_attached_inference_is_unavailable(tiny_manifest):
    service = KServeService(NULL_METRICS, frozenset(), ready=lambda: False, draining=lambda: False)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[ErrorInterceptor(prefix="/inference.")])
    service.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            live = method(channel, "ServerLive", kpb.ServerLiveRequest, kpb.ServerLiveResponse)
            ready = method(channel, "ServerReady", kpb.ServerReadyRequest, kpb.ServerReadyResponse)
            model_ready = method(channel, "ModelReady", kpb.ModelReadyRequest, kpb.ModelReadyResponse)
            assert live(kpb.ServerLiveRequest(), timeout=5).live is True
            assert ready(kpb.ServerReadyRequest(), timeout=5).ready is False
            assert model_ready(kpb.ModelReadyRequest(name=MODEL), timeout=5).ready is False
            tensor = _bytes_input([1])
            req = kpb.ModelInferRequest(model_name=MODEL, inputs=[tensor], raw_input_contents=[_prefixed(jpeg())])
            with pytest.raises(grpc.RpcError) as info:
                method(channel, "ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse)(req, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in (info.value.details() or "")
            stream: grpc.StreamStreamMultiCallable[bytes, bytes]
            stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
            with pytest.raises(grpc.RpcError) as info:
                list(stream(iter([b""]), timeout=5))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in (info.value.details() or "")
    finally:
        server.stop(0)


def test_requests_follow_a_hot_swap(tiny_manifest):
    models: list[ServedModel] = []
    run = start_with_kserve(tiny_manifest, models)
    try:
        metadata = method(run.channel, "ModelMetadata", kpb.ModelMetadataRequest, kpb.ModelMetadataResponse)
        infer = method(run.channel, "ModelInfer", kpb.ModelInferRequest, kpb.ModelInferResponse)
        assert list(metadata(kpb.ModelMetadataRequest(name=MODEL), timeout=5).versions) == ["0.0.1"]
        old = models[0]
        models.append(dataclasses.replace(old, manifest=dataclasses.replace(old.manifest, version="0.0.2")))
        assert list(metadata(kpb.ModelMetadataRequest(name=MODEL), timeout=5).versions) == ["0.0.2"]
        req = kpb.ModelInferRequest(model_name=MODEL, inputs=[_bytes_input([1])],
                                    raw_input_contents=[_prefixed(jpeg())])
        assert infer(req, timeout=10).model_version == "0.0.2"
        req.model_version = "0.0.1"
        err = _plain_infer(run, req)
        assert err.code() == grpc.StatusCode.NOT_FOUND and "version '0.0.1'" in (err.details() or "")
    finally:
        run.channel.close()
        run.server.shutdown(1.0)


def test_long_values_quoted_in_errors_are_cut(run):
    """Quoted whole, a class_filter of 4,300-digit ids, or a shape of 1,900 dims sent unpacked
    (19 KB on the wire: the packed form's size cap does not see it), made an error status too
    large for gRPC's metadata: the client got RESOURCE_EXHAUSTED, the server counted
    INVALID_ARGUMENT."""
    from tests.server.test_wire import _varint

    huge_ids = kpb.InferParameter(string_param=",".join(["9" * 4300] * 7))
    req = kpb.ModelInferRequest(model_name=MODEL, inputs=[_bytes_input([1])], raw_input_contents=[_prefixed(jpeg())],
                                parameters={"class_filter": huge_ids})
    err = _plain_infer(run, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.details() or "") < 500, err.details()

    def ld(field: int, payload: bytes) -> bytes:
        return _varint(field << 3 | 2) + _varint(len(payload)) + payload

    dims = b"".join(_varint(3 << 3) + _varint(2**63 - 1) for _ in range(1900))  # shape, one varint each
    wire = ld(1, MODEL.encode()) + ld(5, ld(1, b"IMAGE") + ld(2, b"BYTES") + dims) + ld(7, _prefixed(jpeg()))
    raw = run.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as err2:
        raw(wire, timeout=10)
    assert err2.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err2.value.details()
    assert "(1900 dims)" in (err2.value.details() or "") and len(err2.value.details() or "") < 500


@pytest.mark.parametrize("service, name", [("/inference.GRPCInferenceService/", "ModelMetadata"),
                                           ("/inference.GRPCInferenceService/", "ServerLive"),
                                           ("/perception.v1.Detector/", "GetModelInfo")])
def test_a_big_request_of_a_method_that_carries_no_frame_is_refused_unparsed(run, service, name):
    """8 MiB of one repeated field held the GIL for 38-62 ms while protobuf parsed it, stalling
    every thread of the server; such requests take a few hundred bytes."""
    from server.wire import MAX_SMALL_REQUEST_BYTES

    call = run.channel.unary_unary(service + name)
    with pytest.raises(grpc.RpcError) as err:
        call(b"\x0a\x00" * (MAX_SMALL_REQUEST_BYTES // 2 + 1), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "at most 65536" in (err.value.details() or "")


def test_long_names_and_bytes_that_are_no_request_get_a_clear_error(run):
    """A 20 KB model or input name used to be quoted whole in the error, whose status then
    exceeded gRPC's metadata limit: the client got RESOURCE_EXHAUSTED instead of the error.
    Bytes that parse as no ModelInferRequest got INTERNAL ("Exception deserializing request")."""
    metadata = method(run.channel, "ModelMetadata", kpb.ModelMetadataRequest, kpb.ModelMetadataResponse)
    with pytest.raises(grpc.RpcError) as err:
        metadata(kpb.ModelMetadataRequest(name="x" * 20_000), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "(20000 characters)" in (err.value.details() or "") and len(err.value.details() or "") < 500
    req = kpb.ModelInferRequest(model_name=MODEL, inputs=[_bytes_input([1])], raw_input_contents=[_prefixed(jpeg())])
    req.inputs[0].datatype = "Q" * 20_000
    err2 = _plain_infer(run, req)
    assert err2.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err2.details() or "") < 500
    garbage = run.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as err3:
        garbage(b"\x0a\xff\xff\xff\xff\x0f", timeout=5)  # model_name claiming 4 GB
    assert err3.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a ModelInferRequest" in (err3.value.details() or "")
    assert run.stub.Detect(request("front", 0, jpeg()), timeout=10).status == pb.FRAME_STATUS_OK


@pytest.mark.parametrize("name, kind", [("ModelMetadata", "ModelMetadataRequest"), ("ModelReady", "ModelReadyRequest"),
                                        ("ModelConfig", "ModelConfigRequest")])
def test_bytes_that_are_no_request_of_the_other_methods_are_invalid_argument(run, name, kind):
    """Their deserializer raised on bytes protobuf refuses (here a name that is not UTF-8): the
    call ended INTERNAL, "Exception deserializing request!", and no error was counted."""
    call = run.channel.unary_unary(f"/inference.GRPCInferenceService/{name}")
    with pytest.raises(grpc.RpcError) as err:
        call(b"\x0a\x02\xff\xfe", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert f"not a {kind}" in (err.value.details() or "")
    assert counter(run, "perception_grpc_errors_total", method=name, code="INVALID_ARGUMENT") == 1
