"""``perception import`` and every output layout, end to end: small detectors of each family's
layout, written here as torch modules with planted outputs (so the right answer is known
exactly), exported to ONNX, imported, served by a real server on a loopback port and called
over gRPC; the boxes must come back in source pixels within 1 px for frames of several sizes
and aspect ratios."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from build_engine.calibration import calibration_set_hash
from perception.cli import main as cli
from perception.manifest import load_manifest
from perception.v1 import detector_pb2 as pb
from perception.v1 import detector_pb2_grpc as pb_grpc
from server.app import create_server
from server.config import ServerConfig

W, H = 320, 256  # model input
CLASSES = ("car", "truck", "pedestrian")
# The planted detection, in model-input pixels: class "truck" (1), score 0.8.
BOX = (128.0, 112.0, 192.0, 144.0)
CLS, SCORE = 1, 0.8
FRAMES = ((640, 512), (1280, 720), (300, 400), (1920, 1080))


def _cxcywh() -> list[float]:
    x1, y1, x2, y2 = BOX
    return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


class Planted(nn.Module):
    """Returns fixed tensors (plus 0 x the input, so the graph depends on it)."""

    def __init__(self, *outputs: torch.Tensor) -> None:
        super().__init__()
        self.outs = [nn.Parameter(o, requires_grad=False) for o in outputs]
        for i, o in enumerate(self.outs):
            self.register_parameter(f"o{i}", o)

    def forward(self, x: torch.Tensor) -> Any:
        zero = x.mean() * 0
        outs = tuple(o + zero.to(o.dtype) if o.is_floating_point() else o + zero.to(torch.int64).to(o.dtype)
                     for o in self.outs)
        return outs if len(outs) > 1 else outs[0]


def yolov5_model() -> Planted:
    out = torch.zeros(1, 4, 5 + len(CLASSES))
    out[0, :, :4] = torch.tensor([[10.0, 10.0, 4.0, 4.0]] * 4)  # decoys with no objectness
    out[0, 2, :4] = torch.tensor(_cxcywh())
    out[0, 2, 4] = 1.0
    out[0, 2, 5:] = torch.tensor([0.1, SCORE, 0.05])
    return Planted(out)


def yolov8_model() -> Planted:
    out = torch.zeros(1, 4 + len(CLASSES), 5)
    out[0, :4, 3] = torch.tensor(_cxcywh())
    out[0, 4:, 3] = torch.tensor([0.1, SCORE, 0.05])
    return Planted(out)


def ssd_model(offsets: bool) -> Planted:
    n = 6
    boxes = torch.zeros(1, n, 4)
    scores = torch.zeros(1, n, len(CLASSES) + 1)
    scores[0, :, 0] = 1.0  # background everywhere ...
    scores[0, 4] = torch.tensor([0.1, 0.05, SCORE, 0.05])  # ... but prior 4 is a truck
    if not offsets:
        x1, y1, x2, y2 = BOX
        boxes[0, 4] = torch.tensor([x1 / W, y1 / H, x2 / W, y2 / H])
    return Planted(boxes, scores)


def priors() -> np.ndarray:
    p = np.tile(np.array([[0.1, 0.1, 0.05, 0.05]], np.float32), (6, 1))
    cx, cy, w, h = _cxcywh()
    p[4] = [cx / W, cy / H, w / W, h / H]
    return p


def nms_model() -> Planted:
    k = 5
    boxes = torch.zeros(1, k, 4)
    boxes[0, 0] = torch.tensor(BOX)
    boxes[0, 1] = torch.tensor([0.0, 0.0, 10.0, 10.0])  # past num_dets: must be ignored
    scores = torch.zeros(1, k)
    scores[0, :2] = torch.tensor([SCORE, 0.99])
    classes = torch.zeros(1, k, dtype=torch.int32)
    classes[0, 0] = CLS
    return Planted(torch.tensor([[1]], dtype=torch.int32), boxes, scores, classes)


class TorchvisionStyle(nn.Module):
    """A single-image export: input (3, H, W), outputs boxes (K, 4), scores (K,), labels (K,)
    with class 0 the background (so labels are class + 1)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zero = x.mean() * 0
        boxes = torch.tensor([BOX]) + zero
        return boxes, torch.tensor([SCORE]) + zero, torch.tensor([CLS + 1], dtype=torch.int64)


MODELS: dict[str, tuple[str, Any, list[str], dict[str, Any]]] = {
    # name: (layout, model factory, output names, export kwargs)
    "yolov5": ("yolov5", yolov5_model, ["output0"],
               {"dynamic_axes": {"images": {0: "batch"}, "output0": {0: "batch"}}}),
    "yolov8": ("yolov8", yolov8_model, ["output0"], {}),
    "ssd": ("ssd", lambda: ssd_model(False), ["boxes", "scores"], {}),
    "ssd_priors": ("ssd", lambda: ssd_model(True), ["bbox_regression", "cls_probs"], {}),
    "nms": ("nms_detections", nms_model, ["num_dets", "det_boxes", "det_scores", "det_classes"], {}),
    "torchvision": ("nms_detections", TorchvisionStyle, ["boxes", "scores", "labels"], {}),
}


def export(name: str, path: Path, input_name: str = "images") -> Path:
    layout, make, names, kw = MODELS[name]
    dummy = torch.zeros(3, H, W) if name == "torchvision" else torch.zeros(1, 3, H, W)
    torch.onnx.export(make().eval(), (dummy,), str(path), dynamo=False, opset_version=17, input_names=[input_name],
                      output_names=names, **kw)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("import")
    (d / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    np.save(d / "priors.npy", priors())
    return d


def import_model(work: Path, name: str, *extra: str, input_name: str = "images") -> Path:
    layout = MODELS[name][0]
    onnx_path = export(name, work / f"{name}.onnx", input_name)
    out = work / f"art_{name}"
    args = ["import", "--onnx", str(onnx_path), "--layout", layout, "--classes", str(work / "classes.txt"),
            "--out", str(out), *extra]
    if name == "ssd_priors":
        args += ["--priors", str(work / "priors.npy"), "--map", "boxes=bbox_regression", "--map", "scores=cls_probs"]
    if name == "torchvision":
        args += ["--class-offset", "1"]
    assert cli(args) == 0
    return out / "manifest.json"


def expected(frame_w: int, frame_h: int) -> np.ndarray:
    """The planted box in source pixels, worked out by hand from the letterbox definition."""
    scale = min(W / frame_w, H / frame_h)
    new_w, new_h = round(frame_w * scale), round(frame_h * scale)
    pad_x, pad_y = (W - new_w) // 2, (H - new_h) // 2
    x1, y1, x2, y2 = BOX
    return np.array([(x1 - pad_x) * frame_w / new_w, (y1 - pad_y) * frame_h / new_h,
                     (x2 - pad_x) * frame_w / new_w, (y2 - pad_y) * frame_h / new_h])


def jpeg(w: int, h: int) -> bytes:
    img = np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buf.tobytes()


@pytest.fixture
def server() -> Iterator[Any]:
    started: list[Any] = []

    def start(manifest: Path) -> tuple[pb_grpc.DetectorStub, str]:
        srv, port = create_server(ServerConfig(model=str(manifest), host="127.0.0.1", port=0, metrics_port=0,
                                               threads=1, warmup_iters=1, grace_s=1.0), CollectorRegistry())
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((srv, ch))
        return pb_grpc.DetectorStub(ch), f"127.0.0.1:{port}"

    yield start
    for srv, ch in started:
        ch.close()
        srv.shutdown(1.0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_layout_serves_boxes_in_source_pixels(work: Path, server: Any, name: str) -> None:
    manifest = import_model(work, name)
    m = load_manifest(manifest)
    assert m.postprocess.output_layout == MODELS[name][0] and m.architecture == "imported"
    assert [v.name for v in m.variants] == ["fp32"] and "not measured" in m.variant().gate["reason"]
    stub, _ = server(manifest)
    for fw, fh in FRAMES:
        frame = pb.Frame(camera_id="cam", sequence=fw, encoded=jpeg(fw, fh))
        resp = stub.Detect(pb.DetectRequest(frame=frame), timeout=30)
        assert resp.status == pb.FRAME_STATUS_OK, resp.message
        assert [(d.class_id, d.class_name) for d in resp.detections] == [(CLS, "truck")], (name, fw, fh)
        d = resp.detections[0]
        np.testing.assert_allclose([d.box.x1, d.box.y1, d.box.x2, d.box.y2], expected(fw, fh), atol=1.0)
        assert d.score == pytest.approx(SCORE, abs=1e-5)  # yolov5: objectness 1 x class score
    # Request options still apply to every layout: a threshold above the score, a class filter.
    frame = pb.Frame(camera_id="cam", sequence=1, encoded=jpeg(640, 512))
    high = stub.Detect(pb.DetectRequest(frame=frame, options=pb.DetectOptions(score_threshold=0.9)), timeout=30)
    other = stub.Detect(pb.DetectRequest(frame=frame, options=pb.DetectOptions(class_filter=[0, 2])), timeout=30)
    assert len(high.detections) == 0 and len(other.detections) == 0


def test_the_same_file_served_otherwise_is_another_version(work: Path) -> None:
    """An imported artifact's version names how it is served, not only its ONNX file: imported
    again with BGR input it is another artifact (the degrader steps between variants of one
    version only), and the same import again is the same version."""
    versions = []
    for out, extra in (("v_rgb", []), ("v_bgr", ["--bgr"]), ("v_rgb_again", [])):
        onnx_path = export("yolov8", work / "versioned.onnx")
        args = ["import", "--onnx", str(onnx_path), "--layout", "yolov8", "--classes", str(work / "classes.txt"),
                "--out", str(work / out), *extra]
        assert cli(args) == 0
        versions.append(load_manifest(work / out).version)
    assert versions[0] != versions[1] and versions[0] == versions[2], versions
    assert all(v.startswith("imported+") for v in versions)


def test_import_refuses_bad_input_in_one_line_and_writes_nothing(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_path = export("yolov8", work / "refuse.onnx")
    out = work / "refused"
    base = ["import", "--onnx", str(onnx_path), "--classes", str(work / "classes.txt"), "--out", str(out)]
    not_onnx = work / "not.onnx"
    not_onnx.write_bytes(b"\x00garbage")
    four = work / "four.txt"
    four.write_text("a\nb\nc\nd\n")
    empty = work / "empty_data"
    empty.mkdir(exist_ok=True)
    (work / "data_img.jpg").write_bytes(jpeg(320, 256))

    def coco(path: Path, names: tuple[str, ...], annotations: bool) -> Path:
        anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0}]
        path.write_text(json.dumps({
            "images": [{"id": 1, "file_name": "data_img.jpg", "width": 320, "height": 256}],
            "annotations": anns if annotations else [],
            "categories": [{"id": c + 1, "name": n} for c, n in enumerate(names)]}))
        return path

    reordered = coco(work / "reordered.json", ("truck", "car", "pedestrian"), annotations=True)
    unlabelled = coco(work / "unlabelled.json", CLASSES, annotations=False)
    not_artifact = work / "a_checkpoint_dir"
    not_artifact.mkdir(exist_ok=True)
    (not_artifact / "detector.pt").write_bytes(b"weights")
    cases = [
        (["import", "--onnx", str(not_onnx), "--layout", "yolov8", "--classes", str(work / "classes.txt"),
          "--out", str(out)], "not an ONNX model"),
        ([*base, "--layout", "yolov5"], "expected (B, N, 8)"),  # a yolov8 model declared as yolov5
        ([*base, "--layout", "ssd"], "needs boxes"),
        (["import", "--onnx", str(onnx_path), "--layout", "yolov8", "--classes", str(four), "--out", str(out)],
         "expected (B, 8, N) for 4 classes"),
        ([*base, "--layout", "yolov8", "--data", str(empty)], "neither annotations.json"),
        # the same names in another order: every id would be scored against another class
        ([*base, "--layout", "yolov8", "--data", str(reordered)], "reorder --classes"),
        # nothing labelled: every variant would score "no data" and pass
        ([*base, "--layout", "yolov8", "--data", str(unlabelled)], "no labelled object"),
    ]
    for argv, needle in cases:
        assert cli(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert not out.exists(), "a refused import left a directory behind"
    assert not [p for p in work.iterdir() if p.name.startswith(".refused")], "staging left behind"
    # Neither import nor build replaces a directory that is not an artifact (a checkpoint's).
    for argv in (["import", "--onnx", str(onnx_path), "--layout", "yolov8", "--classes", str(work / "classes.txt"),
                  "--out", str(not_artifact)], ["build", "--out", str(not_artifact)]):
        assert cli(argv) == 1, argv
        assert "is not an artifact directory" in capsys.readouterr().err
        assert (not_artifact / "detector.pt").read_bytes() == b"weights"


def planted_data(data: Path) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]:
    """A COCO set of FRAMES, each with the planted truck labelled where it is: the directory,
    its images and its annotations."""
    (data / "images").mkdir(parents=True)
    images, anns = [], []
    for i, (fw, fh) in enumerate(FRAMES, start=1):
        (data / "images" / f"{i}.jpg").write_bytes(jpeg(fw, fh))
        x1, y1, x2, y2 = expected(fw, fh)
        images.append({"id": i, "file_name": f"{i}.jpg", "width": fw, "height": fh})
        anns.append({"id": i, "image_id": i, "category_id": CLS + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    cats = [{"id": c + 1, "name": n} for c, n in enumerate(CLASSES)]
    (data / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return data, images, anns


def test_eval_of_an_imported_onnx_reads_it_as_its_artifact_says(work: Path, tmp_path: Path) -> None:
    """`perception eval --onnx` of an artifact's model decodes and pre-processes it as the
    artifact declares: an SSD imported with its priors (eval used to decode it without them)
    finds the planted truck everywhere; data whose classes are the model's in another order is
    refused."""
    data, images, anns = planted_data(tmp_path / "data")
    manifest = import_model(work, "ssd_priors")
    out = tmp_path / "kpi"
    assert cli(["eval", "--onnx", str(manifest.parent / "model.fp32.onnx"), "--data", str(data), "--out",
                str(out)]) == 0
    kpi = json.loads((out / "kpi.json").read_text())
    assert kpi["recall"] == pytest.approx(1.0) and kpi["map50"] > 0.9, kpi
    swapped = [{"id": c + 1, "name": n} for c, n in enumerate((CLASSES[1], CLASSES[0], *CLASSES[2:]))]
    (data / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": swapped}))
    assert cli(["eval", "--onnx", str(manifest.parent / "model.fp32.onnx"), "--data", str(data)]) != 0


def test_import_with_data_builds_scores_and_gates_variants(work: Path, tmp_path: Path) -> None:
    """With labelled data: FP16 and INT8 variants are calibrated and scored through the frame
    pipeline with the project's KPI and gated like `perception build`; the planted model
    finds the one labelled truck in every image."""
    data, images, anns = planted_data(tmp_path / "data")
    # An input named otherwise than "images" (as most exports name it): INT8 used to be skipped.
    # Two images scored, the other two calibrate INT8: calibration never sees a scored image.
    manifest = import_model(work, "yolov8", "--data", str(data / "annotations.json"), "--latency-runs", "3",
                            "--threads", "1", "--calib-images", "4", "--val-images", "2", input_name="input")
    m = load_manifest(manifest)
    assert [v.name for v in m.variants] == ["fp32", "fp16", "int8"]
    for v in m.variants:
        assert set(v.metrics) == {"map50_95", "map50", "precision", "recall"} and v.latency_ms["min"] > 0
        assert v.metrics["map50"] == pytest.approx(1.0) and v.metrics["recall"] == pytest.approx(1.0)
        assert isinstance(v.gate["passed"], bool) and v.gate["reason"]
    # The frames a server verifies the model on before a hot swap, as `perception build` ships them.
    assert m.verification is not None and len(m.verification.frames) == 2
    assert set(m.verification.expected) == {"fp32", "fp16", "int8"}
    assert all(len(rows) == 1 for rows in m.verification.expected["fp32"])  # the planted truck
    cal = m.variant("int8").calibration
    assert cal is not None and m.variant("int8").parent == "fp32"
    assert cal.set_sha256 == calibration_set_hash([data / "images" / "3.jpg", data / "images" / "4.jpg"])


def test_default_detector_with_nms_in_its_graph_serves_the_same_detections(tmp_path: Path, server: Any) -> None:
    """The shipped default detector, exported as usual (yolo_obj, the server's NMS) and once
    with NMS inside its graph (nms_detections, the server's NMS skipped), imported and served:
    the same detections on real drive frames, matched by IoU >= 0.9."""
    from build_engine.build import export_fp32_artifact
    from build_engine.nms_export import export_nms_detections
    from perception.parity import parity
    from perception.types import Detections
    from tests.conftest import REPO_ROOT

    plain = export_fp32_artifact(REPO_ROOT / "models/default/detector.pt", tmp_path / "plain")
    m = load_manifest(plain)
    nms_onnx = export_nms_detections(m.path_of(m.variant()), tmp_path / "nms.onnx", m.postprocess.iou_threshold,
                                     m.postprocess.score_threshold, m.postprocess.max_detections)
    (tmp_path / "classes.txt").write_text("\n".join(m.classes) + "\n")
    assert cli(["import", "--onnx", str(nms_onnx), "--layout", "nms_detections", "--classes",
                str(tmp_path / "classes.txt"), "--out", str(tmp_path / "nms")]) == 0
    started = [server(plain), server(tmp_path / "nms" / "manifest.json")]
    stubs = [stub for stub, _ in started]
    cap = cv2.VideoCapture(str(REPO_ROOT / "assets/drives/demo/front.mp4"))
    dets: list[list[Detections]] = [[], []]
    for i in range(12):
        ok, img = cap.read()
        assert ok
        if i % 3:
            continue
        data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        for k, stub in enumerate(stubs):
            resp = stub.Detect(pb.DetectRequest(frame=pb.Frame(camera_id="front", sequence=i, encoded=data)),
                               timeout=30)
            assert resp.status == pb.FRAME_STATUS_OK
            boxes = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in resp.detections], np.float32)
            dets[k].append(Detections(boxes.reshape(-1, 4), np.array([d.score for d in resp.detections], np.float32),
                                      np.array([d.class_id for d in resp.detections], np.int64)))
    cap.release()
    par = parity(dets[0], dets[1], iou=0.9)
    assert par["reference_detections"] >= 20, par  # the frames have objects to find
    assert par["vanished"] == 0.0 and par["moved"] == 0.0 and par["appeared"] <= 0.02, par

    # Replay evaluation and `perception compare` work on the imported model as on any other.
    drive = REPO_ROOT / "assets/drives/demo"
    outs = []
    for k, (_, address) in enumerate(started):
        out = tmp_path / f"replay{k}.jsonl"
        summary = tmp_path / f"summary{k}.json"
        assert cli(["replay", str(drive / "drive.mcap"), "--server", address, "--out", str(out), "--max-rate",
                    "--max-frames", "16", "--gt", str(drive / "gt.json"), "--json-out", str(summary),
                    "--no-progress"]) == 0
        result = json.loads(summary.read_text())
        assert result["frames_answered"] == 16 and result["kpi"]["map50"] > 0.3, result.get("kpi")
        outs.append(out)
    cmp_json = tmp_path / "compare.json"
    assert cli(["compare", str(outs[0]), str(outs[1]), "--gt", str(drive / "gt.json"),
                "--json-out", str(cmp_json)]) == 0
    assert cmp_json.is_file() and json.loads(cmp_json.read_text())


def test_a_single_image_export_imports_with_data_and_is_scored_by_eval(work: Path, tmp_path: Path) -> None:
    """A single-image export (input (3, H, W)) used to be refused by `import --data` ("a
    single-image model got a batch of 4": the gate scores in batches) and by `eval --onnx`; its
    INT8 calibration fed (1, 3, H, W) into the rank-3 input. Now every variant is built and
    scored, and eval of the artifact's model finds the planted truck everywhere."""
    data, _, _ = planted_data(tmp_path / "data")
    manifest = import_model(work, "torchvision", "--data", str(data), "--latency-runs", "2", "--threads", "1",
                            "--val-images", "2", "--calib-images", "2")
    m = load_manifest(manifest)
    assert [v.name for v in m.variants] == ["fp32", "fp16", "int8"]
    for v in m.variants:
        assert v.metrics["map50"] == pytest.approx(1.0) and v.metrics["recall"] == pytest.approx(1.0), v.name
    out = tmp_path / "kpi"
    assert cli(["eval", "--onnx", str(manifest.parent / "model.fp32.onnx"), "--data", str(data), "--out",
                str(out)]) == 0
    kpi = json.loads((out / "kpi.json").read_text())
    assert kpi["num_images"] == len(FRAMES) and kpi["recall"] == pytest.approx(1.0), kpi


class Stride32(nn.Module):
    """The planted yolov8 output behind a stride-32 pool and upsample added back to the input,
    as a real backbone's feature pyramid does: runs only at sizes that are multiples of 32."""

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        self.head = yolov8_model()
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        up = nn.functional.interpolate(nn.functional.avg_pool2d(x, 32), scale_factor=32.0)
        return self.head((up + x).mean() * 0 + x)


def _dynamic_size_model(path: Path, channels_last: bool = False) -> Path:
    shape = (1, H, W, 3) if channels_last else (1, 3, H, W)
    axes = {1: "h", 2: "w"} if channels_last else {2: "h", 3: "w"}
    torch.onnx.export(Stride32(channels_last).eval(), (torch.zeros(shape),), str(path), dynamo=False,
                      opset_version=17, input_names=["images"], output_names=["output0"],
                      dynamic_axes={"images": axes})
    return path


def _half_input_model(path: Path) -> Path:
    """The yolov8 export behind a float16 input (as Ultralytics' half=True writes it)."""
    import onnx

    model = onnx.load(str(export("yolov8", path)))
    inp = model.graph.input[0]
    inner = inp.name
    inp.name = "images_half"
    inp.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    model.graph.node.insert(0, onnx.helper.make_node("Cast", ["images_half"], [inner], to=onnx.TensorProto.FLOAT))
    onnx.save(model, str(path))
    return path


def _undecodable_model(path: Path) -> Path:
    """A yolov8-named output whose channel count the graph computes at run time (so neither
    it nor onnxruntime can tell it, and binding accepts it) and which holds 4 + 5 channels,
    not 4 + 3: it cannot be decoded for three classes."""
    import onnx
    from onnx import TensorProto, helper

    def const(name: str, dtype: int, dims: list[int], values: list[Any]) -> Any:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "_v", dtype, dims, values))

    nodes = [const("zeros", TensorProto.FLOAT, [1, 1, 5], [0.0] * 5),
             const("nine", TensorProto.FLOAT, [1], [9.0]),
             const("one", TensorProto.INT64, [1], [1]),
             const("five", TensorProto.INT64, [1], [5]),
             helper.make_node("ReduceMean", ["images"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zeros_0"], ["m0"]),
             helper.make_node("Add", ["m0", "nine"], ["c_float"]),
             helper.make_node("Cast", ["c_float"], ["c"], to=TensorProto.INT64),
             helper.make_node("Concat", ["one", "c", "five"], ["shape"], axis=0),
             helper.make_node("Expand", ["zeros", "shape"], ["output0"])]
    nodes.insert(0, const("zeros_0", TensorProto.FLOAT, [], [0.0]))
    graph = helper.make_graph(
        nodes, "undecodable", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, H, W])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, "channels", 5])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _ssd(path: Path, boxes: list[float], scores: list[float]) -> Path:
    """An SSD with outputs named as raw-offset exports name them; box row 2 and score row 2
    planted, the rest 0."""
    b, s = torch.zeros(1, 6, 4), torch.zeros(1, 6, len(CLASSES) + 1)
    b[0, 2], s[0, 2] = torch.tensor(boxes), torch.tensor(scores)
    torch.onnx.export(Planted(b, s).eval(), (torch.zeros(1, 3, H, W),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["loc", "conf"])
    return path


def _tensorrt_nms(path: Path) -> Path:
    """A YOLO TensorRT end-to-end export's tail: EfficientNMS_TRT over constant boxes/scores."""
    import onnx
    from onnx import TensorProto, helper

    k = 10
    nodes = [helper.make_node("Constant", [], ["raw_boxes"], value=helper.make_tensor(
                 "b", TensorProto.FLOAT, [1, 100, 4], [0.0] * 400)),
             helper.make_node("Constant", [], ["raw_scores"], value=helper.make_tensor(
                 "s", TensorProto.FLOAT, [1, 100, 3], [0.0] * 300)),
             helper.make_node("EfficientNMS_TRT", ["raw_boxes", "raw_scores"],
                              ["num_dets", "det_boxes", "det_scores", "det_classes"], background_class=-1,
                              max_output_boxes=k, score_threshold=0.25, iou_threshold=0.45, plugin_version="1",
                              score_activation=0, box_coding=0)]
    graph = helper.make_graph(
        nodes, "trt_end2end", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, H, W])],
        [helper.make_tensor_value_info("num_dets", TensorProto.INT32, [1, 1]),
         helper.make_tensor_value_info("det_boxes", TensorProto.FLOAT, [1, k, 4]),
         helper.make_tensor_value_info("det_scores", TensorProto.FLOAT, [1, k]),
         helper.make_tensor_value_info("det_classes", TensorProto.INT32, [1, k])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


REFUSED: dict[str, tuple[Any, str, list[str], str]] = {
    # case: (model writer, layout, extra flags, what the one-line refusal must say)
    "tensorrt_plugin": (_tensorrt_nms, "nms_detections", [], "TensorRT plugin op(s) ['EfficientNMS_TRT']"),
    "half_input": (_half_input_model, "yolov8", [], "is float16; the server feeds float32"),
    "channels_last": (lambda p: _dynamic_size_model(p, channels_last=True), "yolov8", ["--input-size", "320x256"],
                      "channel-last (NHWC)"),
    "size_off_stride": (_dynamic_size_model, "yolov8", ["--input-size", "330x250"],
                        "is 330x250 a size it takes, e.g. a multiple of its stride?"),
    "undecodable": (_undecodable_model, "yolov8", [], "expected one image's output (7, N), got (9, 5)"),
    "priors_count": (lambda p: export("ssd_priors", p), "ssd",
                     ["--map", "boxes=bbox_regression", "--map", "scores=cls_probs"],
                     "--priors has 8 prior boxes, but the model's boxes output 'bbox_regression' [1, 6, 4] has 6"),
    "ssd_raw_offsets": (lambda p: _ssd(p, [1.7, -2.4, 3.1, -0.6], [0.1, 0.05, 0.8, 0.05]), "ssd", [],
                        "need --priors"),
    "ssd_logits": (lambda p: _ssd(p, [0.4, 0.4, 0.6, 0.6], [-2.0, 0.5, 4.0, -1.0]), "ssd", [],
                   "export the softmax'd"),
    "class_offset_not_nms": (lambda p: export("yolov5", p), "yolov5", ["--class-offset", "1"],
                             "--class-offset only applies to --layout nms_detections"),
    "pad_value": (lambda p: export("yolov8", p), "yolov8", ["--pad-value", "300"], "--pad-value must be in 0..255"),
    # A model whose boxes or scores are NaN / Inf throughout used to import (exit 0) and serve
    # nothing, or NaN boxes, to every frame.
    "all_nan": (lambda p: _constant_yolov8(p, planted=_planted(np.s_[:])), "yolov8", [],
                "all_nan.onnx: every value of its boxes (output 'output0') and scores (output 'output0') is NaN/Inf "
                f"on one {W}x{H} frame"),
    "nan_boxes": (lambda p: _constant_yolov8(p, planted=_planted(np.s_[:4])), "yolov8", [],
                  "every value of its boxes (output 'output0') is NaN/Inf"),
    "inf_scores": (lambda p: _constant_yolov8(p, planted=_planted(np.s_[4:], np.inf)), "yolov8", [],
                   "every value of its scores (output 'output0') is NaN/Inf"),
    # A fixed batch of 16 used to import as max batch 8, every run then computing 16 frames.
    "fixed_batch": (lambda p: _edited(p, _fixed_batch(16)), "yolov8", [],
                    "fixed_batch.onnx: input 'images' has a fixed batch of 16 ([16, 3, 256, 320]): every run would "
                    "compute 16 frames however few are sent"),
    # onnxruntime's refusals used to name the staging copy (deleted by then), not the user's file.
    "ir_too_new": (lambda p: _edited(p, lambda m: setattr(m, "ir_version", 99)), "yolov8", [],
                   "ir_too_new.onnx: onnxruntime cannot load it: Unsupported model IR version: 99"),
    "opset_too_new": (lambda p: _edited(p, lambda m: setattr(m.opset_import[0], "version", 99)), "yolov8", [],
                      "opset_too_new.onnx: onnxruntime cannot load it: ONNX Runtime only *guarantees*"),
    "no_opset": (lambda p: _edited(p, lambda m: m.ClearField("opset_import")), "yolov8", [],
                 "no_opset.onnx: onnxruntime cannot load it: Missing opset in the model."),
    "custom_op": (lambda p: _edited(p, _custom_op), "yolov8", [],
                  "custom_op.onnx: onnxruntime cannot load it: Fatal error: com.example:Frobnicate(-1) is not a "
                  "registered function/op"),
    # protobuf reads an empty file as an empty model: it "had no image input" ([]).
    "empty_file": (lambda p: (p.write_bytes(b""), p)[1], "yolov8", [], "empty_file.onnx: not an ONNX model (the file "
                   "is empty)"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_import_without_data_refuses_what_the_server_could_not_serve(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """Import without --data used to accept each of these, and a server loading the artifact
    started healthy and then failed (or misread) every frame: now each is refused in one line
    naming the fix, and nothing is written."""
    write, layout, extra, needle = REFUSED[case]
    onnx_path = write(tmp_path / f"{case}.onnx")
    eight = np.tile(priors()[:1], (8, 1))
    np.save(tmp_path / "eight_priors.npy", eight)
    if case == "priors_count":
        extra = [*extra, "--priors", str(tmp_path / "eight_priors.npy")]
    out = tmp_path / "out"
    assert cli(["import", "--onnx", str(onnx_path), "--layout", layout, "--classes", str(work / "classes.txt"),
                "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    assert ".building-" not in err and "model.fp32.onnx" not in err, err  # the staging copy is no name to give


def _planted(where: Any, value: float = np.nan) -> np.ndarray:
    """The planted yolov8 output (1, 7, 5) with ``value`` at ``where`` of its one image."""
    out = yolov8_model().outs[0].detach().numpy().copy()
    out[0][where] = value
    return out


def _edited(path: Path, edit: Any) -> Path:
    """The constant yolov8 graph, its ModelProto changed by ``edit`` before it is saved."""
    import onnx

    model = onnx.load(str(_constant_yolov8(path)))
    edit(model)
    onnx.save(model, str(path))
    return path


def _fixed_batch(batch: int) -> Any:
    def edit(model: Any) -> None:
        for value in (model.graph.input[0], model.graph.output[0]):
            value.type.tensor_type.shape.dim[0].dim_value = batch
    return edit


def _custom_op(model: Any) -> None:
    """An op of a domain onnxruntime has no kernel for, as a second output."""
    from onnx import TensorProto, helper

    model.graph.node.append(helper.make_node("Frobnicate", ["mean"], ["fx"], domain="com.example"))
    model.graph.output.append(helper.make_tensor_value_info("fx", TensorProto.FLOAT, None))
    model.opset_import.append(helper.make_opsetid("com.example", 1))


def test_import_warns_of_outputs_partly_nan(work: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Some NaN among the values (a decoy candidate's box) imports, warning how many: the rest
    may well be read; it used to pass without a word."""
    onnx_path = _constant_yolov8(tmp_path / "m.onnx", planted=_planted(np.s_[:4, 0]))
    assert cli(["import", "--onnx", str(onnx_path), "--layout", "yolov8", "--classes", str(work / "classes.txt"),
                "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    warned = [r.getMessage() for r in caplog.records if "NaN/Inf" in r.getMessage()]
    assert warned == [f"{onnx_path}: 4 of the 20 values of its boxes (output 'output0') are NaN/Inf on one {W}x{H} "
                      "frame: the detections read from them will be missing or wrong"], warned


@pytest.mark.parametrize("dim", [-1, 0])
def test_a_dimension_written_as_minus_one_or_zero_is_dynamic(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], dim: int
) -> None:
    """Exporters write a dynamic axis as dim_value -1 (Paddle2ONNX, tf2onnx) or 0: a batch of -1
    was recorded as max batch 1 in silence, a height / width of -1 refused with no way forward
    ("input_width must be in 1..8192, got -1"), and of 0 run as a literal 0 by onnxruntime. Each
    is dynamic now: the batch is tried at 8, and the size taken from --input-size."""
    import onnx

    def batch(model: Any) -> None:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = dim

    def size(model: Any) -> None:
        for axis in (2, 3):
            model.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = dim

    base = ["import", "--layout", "yolov8", "--classes", str(work / "classes.txt"), "--no-progress"]
    assert cli([*base, "--onnx", str(_edited(tmp_path / "batch.onnx", batch)), "--out", str(tmp_path / "b")]) == 0
    v = load_manifest(tmp_path / "b").variant()
    assert (v.max_batch, tuple(v.input_shape)) == (8, (-1, 3, H, W))
    sized = _edited(tmp_path / "size.onnx", size)
    capsys.readouterr()
    assert cli([*base, "--onnx", str(sized), "--out", str(tmp_path / "never")]) == 1
    assert capsys.readouterr().err.strip() == (f"perception import: error: {sized}: the input height/width are "
                                               "dynamic; pass --input-size WxH")
    assert cli([*base, "--onnx", str(sized), "--out", str(tmp_path / "s"), "--input-size", f"{W}x{H}"]) == 0
    v = load_manifest(tmp_path / "s").variant()
    assert tuple(v.input_shape) == (-1, 3, -1, -1)
    shipped = onnx.load(str(tmp_path / "s" / v.file)).graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_param") for d in shipped] == [True, False, True, True]  # no literal 0 or -1 left


@pytest.mark.parametrize("extra", [[], ["--pad-value", "0"]])
def test_the_counterparts_of_the_refused_import_and_serve(work: Path, tmp_path: Path, extra: list[str]) -> None:
    """The same dynamic-size model at a multiple of its stride, and an SSD whose boxes are
    normalised corners and scores probabilities, import; --pad-value is recorded."""
    for name, onnx_path, layout, more in (
        ("stride", _dynamic_size_model(tmp_path / "stride.onnx"), "yolov8", ["--input-size", "320x256"]),
        ("ssd", _ssd(tmp_path / "ssd.onnx", [0.4, 0.4, 0.6, 0.6], [0.1, 0.05, 0.8, 0.05]), "ssd", []),
    ):
        out = tmp_path / name
        assert cli(["import", "--onnx", str(onnx_path), "--layout", layout, "--classes", str(work / "classes.txt"),
                    "--out", str(out), *more, *extra]) == 0
        m = load_manifest(out / "manifest.json")
        assert m.preprocess.pad_value == (0 if extra else 114)
        # A dynamic height and width are recorded as such: a TensorRT engine of the file is then
        # built for, and named by, the manifest's size (server.runtime.fingerprint).
        assert m.variants[0].input_shape[2:] == ((-1, -1) if name == "stride" else (m.preprocess.input_height,
                                                                                     m.preprocess.input_width))


def _constant_yolov8(path: Path, boxes_normalised: bool = False, batch_one_only: bool = False,
                     planted: np.ndarray | None = None) -> Path:
    """A yolov8 graph, written with onnx.helper, that outputs the planted truck (in pixels, or
    with ``boxes_normalised`` as fractions of the input: a common export mistake; or the
    ``planted`` (1, 7, 5) values) plus 0 x each image's mean, over a dynamic batch axis. With
    ``batch_one_only`` the per-image means are reshaped to [1, 1, 1], as a graph traced with a
    fixed batch does: it runs at batch 1 only."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = yolov8_model().outs[0].detach().numpy().copy() if planted is None else planted
    if boxes_normalised:
        out[0, :4] /= np.array([W, H, W, H], np.float32)[:, None]
    inits = [numpy_helper.from_array(out, "planted"), numpy_helper.from_array(np.array(0, np.float32), "zero"),
             numpy_helper.from_array(np.array([1 if batch_one_only else -1, 1, 1], np.int64), "shape")]
    nodes = [helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Reshape", ["mean", "shape"], ["per_image"]),
             helper.make_node("Mul", ["per_image", "zero"], ["nothing"]),
             helper.make_node("Add", ["planted", "nothing"], ["output0"])]
    graph = helper.make_graph(
        nodes, "constant_yolov8", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, H, W])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + len(CLASSES), 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_import_with_data_refuses_a_model_that_finds_nothing(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A yolov8 export whose boxes are fractions of the input, not pixels, finds none of the
    labelled trucks: it used to import with --data (FP32 is the reference, judged on latency
    only; FP16 / INT8 drop nothing from 0) and ship, its verification frames recording "no
    detections". Now the import fails in one line naming the likely causes, and writes
    nothing; --min-map50 0 turns the check off."""
    data, _, _ = planted_data(tmp_path / "data")
    onnx_path = _constant_yolov8(tmp_path / "normalised.onnx", boxes_normalised=True)
    out = tmp_path / "out"
    argv = ["import", "--onnx", str(onnx_path), "--layout", "yolov8", "--classes", str(work / "classes.txt"),
            "--out", str(out), "--data", str(data), "--latency-runs", "2", "--threads", "1", "--no-progress"]
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "FP32 mAP50 0.0000" in err and "is below --min-map50 0.01" in err, err
    for cause in ("--layout (yolov8)", "--bgr", "--scale", "--mean / --std", "normalised to 0..1", "--classes"):
        assert cause in err, (cause, err)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert cli([*argv, "--precisions", "fp32", "--min-map50", "0"]) == 0
    assert load_manifest(out).variant("fp32").metrics["map50"] == 0.0
    assert cli([*argv, "--min-map50", "1.5"]) == 1
    assert "--min-map50 must be in 0..1" in capsys.readouterr().err


def test_import_warns_of_mean_and_std_in_0_255_units_after_a_0_1_scale(
    work: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--mean / --std apply after --scale: ImageNet's 0..255 values with the default 1/255 scale
    feed the model inputs far from any it was trained on, so the import warns; with --scale 1
    they are in the right units and it does not."""
    onnx_path = _constant_yolov8(tmp_path / "m.onnx")
    base = ["import", "--onnx", str(onnx_path), "--layout", "yolov8", "--classes", str(work / "classes.txt"),
            "--mean", "123.675,116.28,103.53", "--std", "58.395,57.12,57.375", "--no-progress"]
    assert cli([*base, "--out", str(tmp_path / "mixed")]) == 0
    warned = [r.getMessage() for r in caplog.records if "looks like 0..255 units" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith("--mean 123.675,116.28,103.53") and \
        warned[1].startswith("--std 58.395,57.12,57.375"), warned
    caplog.clear()
    assert cli([*base, "--scale", "1", "--out", str(tmp_path / "unscaled")]) == 0
    assert not [r for r in caplog.records if "0..255 units" in r.getMessage()]


def test_a_model_that_runs_at_batch_1_only_is_recorded_with_max_batch_1(
    work: Path, tmp_path: Path, server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A graph declaring a dynamic batch that runs at batch 1 only used to be recorded with max
    batch 8: the server's warm-up at batch 8 then failed with onnxruntime's own error, and with
    --data the gate's batches of 4 failed the import. Now the import runs a batch of the max
    batch it would record and, as that fails, records 1 with a warning: the model serves, and
    with --data it is scored one frame at a time. The same graph with a working batch axis is
    recorded with 8."""
    one = _constant_yolov8(tmp_path / "batch_one.onnx", batch_one_only=True)
    any_batch = _constant_yolov8(tmp_path / "any_batch.onnx")
    base = ["import", "--layout", "yolov8", "--classes", str(work / "classes.txt"), "--no-progress"]
    assert cli([*base, "--onnx", str(one), "--out", str(tmp_path / "one")]) == 0
    v = load_manifest(tmp_path / "one").variant()
    assert v.max_batch == 1 and tuple(v.input_shape) == (-1, 3, H, W)
    assert any("recording max batch 1" in r.getMessage() for r in caplog.records)
    stub, _ = server(tmp_path / "one" / "manifest.json")
    frame = pb.Frame(camera_id="cam", sequence=1, encoded=jpeg(640, 512))
    resp = stub.Detect(pb.DetectRequest(frame=frame), timeout=30)
    assert resp.status == pb.FRAME_STATUS_OK and [d.class_name for d in resp.detections] == ["truck"]
    assert cli([*base, "--onnx", str(any_batch), "--out", str(tmp_path / "any")]) == 0
    assert load_manifest(tmp_path / "any").variant().max_batch == 8
    data, _, _ = planted_data(tmp_path / "data")
    assert cli([*base, "--onnx", str(one), "--out", str(tmp_path / "scored"), "--data", str(data), "--latency-runs",
                "2", "--threads", "1", "--calib-images", "2", "--val-images", "2"]) == 0
    m = load_manifest(tmp_path / "scored")
    assert [(v.name, v.max_batch, v.metrics["map50"]) for v in m.variants] == [
        ("fp32", 1, pytest.approx(1.0)), ("fp16", 1, pytest.approx(1.0)), ("int8", 1, pytest.approx(1.0))]


def test_the_class_list_is_read_as_utf8_with_distinct_names(work: Path, tmp_path: Path) -> None:
    """A byte-order mark (Windows editors write one) used to become part of the first class
    name ('\\ufeffcar'), a file in another encoding failed with a bare codec error naming no
    file, and duplicate names or a blank line between names (every later name one class id
    down) were accepted. Now the mark is dropped, and the others are DataErrors naming the file
    and the names or lines."""
    from build_engine.data.formats import read_classes
    from perception.errors import DataError

    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfcar\r\ntruck\r\npedestrian\r\n\r\n")
    assert read_classes(bom) == CLASSES
    onnx_path = _constant_yolov8(tmp_path / "m.onnx")
    assert cli(["import", "--onnx", str(onnx_path), "--layout", "yolov8", "--classes", str(bom), "--out",
                str(tmp_path / "art"), "--no-progress"]) == 0
    assert load_manifest(tmp_path / "art").classes == CLASSES
    cases = {"latin1.txt": ("café\ntruck\npedestrian\n".encode("latin-1"), "is not UTF-8 text"),
             "dupes.txt": (b"car\ntruck\nCar \n", "class names ['car', 'Car'] are given more than once"),
             "gap.txt": (b"car\n\ntruck\npedestrian\n", "line(s) [2] are blank, before the last class name")}
    for name, (content, needle) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError) as err:
            read_classes(tmp_path / name)
        assert str(err.value).startswith(f"{tmp_path / name}: ") and needle in str(err.value), err.value
