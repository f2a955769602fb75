"""Kernel measurements behind the code's choices, side by side in one run (docs/performance.md).

1. JPEG decode of a synthetic 1920x1080 road frame (q90; with sensor noise, and without) then
   resize: full decode (IMREAD_COLOR) + resize vs libjpeg's DCT-reduced decode
   (IMREAD_REDUCED_COLOR_2 to 640x360, _4 to 320x180) + resize.
   Why ``perception.decode`` decodes at reduced scale when the frame is >= 2x the input.
2. NMS: ``perception.nms.batched_nms`` (numpy greedy) vs OpenCV's C++ ``cv2.dnn.NMSBoxesBatched``
   on seeded clustered candidates, at ~4,000, 1,000 (the manifest's default pre-NMS top-k) and
   300 candidates; ms each, ratio, and whether the kept sets agree. Why candidates are cut by
   score and top-k before NMS.
3. INT8 on the CPU: a tiny 8-layer Conv(BN folded)+activation detector-like model at 1x3x384x640,
   ReLU / SiLU / Hardswish, FP32 vs QDQ INT8 with U8 activations vs S8 activations (onnxruntime,
   1 intra-op thread, round-robin). Why ``build_engine.quantize`` uses U8 activations.
4. Decode cost by format: ``perception.decode.decode_encoded`` to a 640x384 input of synthetic
   road frames at 1280x720, 1920x1080 and 3840x2160 as baseline JPEG (q90; decoded at reduced
   scale), progressive JPEG (q90) and PNG (both decoded at full size, whatever the input). Why
   the server's ``max_full_buffer_pixels`` defaults to 1080p.
5. Normalisation of a letterboxed 512x288 canvas (the shipped model's input) to the float CHW
   input: multiplying the strided, transposed uint8 view at once (before) vs ``cv2.split`` into
   contiguous planes then one multiply per plane (``perception.preprocess.normalize_into``);
   ms each, and whether the results are equal to the bit.
6. The floor of a gRPC call in Python: a bare grpcio server in another process whose handlers
   answer at once (no pipeline, no interceptors), a 100 KB request (a 1280x720 JPEG's size)
   and a 700-byte answer (20 detections), unary and stream lockstep; p50 of the round trip.
   What any Python gRPC server pays per frame before it does any work. And a unary call to a
   handler that sleeps 7 ms before answering (as a frame's work keeps it): the time the call
   spends outside the handler, which an echo understates where threads woken from idle start
   late.
7. Box IoU matrices (``perception.boxes.box_iou``) at 10, 50 and 100 boxes a side:
   broadcasting (N, 1, 2) corner pairs against (1, M, 2) (before) vs coordinate by coordinate,
   (N, 1) columns against (M,) rows (now); and ``box_iou`` vs the tracker's compiled loop
   (``perception.tracking.kernels.pairwise_iou``, its first call's compile not timed); us
   each, and whether equal to the bit.

Not a test: nothing is asserted. Timings swing with other jobs on a shared machine; the
variants of each measurement are interleaved so load hits them alike: compare ratios.

    .venv/bin/python -m bench.bench_kernels [--only decode nms int8 formats normalize grpc iou] [--decode-runs N]
        [--nms-runs N] [--int8-runs N] [--format-runs N] [--cv-threads T] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

PARTS = ("decode", "nms", "int8", "formats", "normalize", "grpc", "iou")
ACTIVATIONS = ("relu", "silu", "hardswish")
INPUT_HW = (384, 640)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --- 1. JPEG decode -------------------------------------------------------------------------


def synthetic_frame(w: int = 1920, h: int = 1080, seed: int = 0, noise_sigma: float = 4.0) -> np.ndarray:
    """A road-like frame: sky and road gradients, lane lines, vehicles, poles, sensor noise
    (Gaussian, ``noise_sigma`` grey levels; 0 = a perfectly denoised camera)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    img = np.empty((h, w, 3), np.float32)
    sky = y < 0.45
    # Sky: blue to pale towards the horizon; road: grey, darker towards the camera, slight vignette.
    img[..., 0] = np.where(sky, 230 - 60 * y, 110 - 40 * (y - 0.45)) - 20 * (x - 0.5) ** 2
    img[..., 1] = np.where(sky, 180 - 30 * y, 105 - 40 * (y - 0.45)) - 20 * (x - 0.5) ** 2
    img[..., 2] = np.where(sky, 120 + 60 * y, 100 - 40 * (y - 0.45)) - 20 * (x - 0.5) ** 2
    out: np.ndarray = np.clip(img, 0, 255).astype(np.uint8)
    hz = int(0.45 * h)
    for k in (-1, 0, 1):  # lane markings converging on the horizon
        cv2.line(out, (w // 2 + k * 40, hz), (w // 2 + k * 900, h), (230, 230, 230), 6, cv2.LINE_AA)
    for _ in range(6):  # poles and trees at the roadside
        px = int(rng.integers(0, w))
        cv2.rectangle(out, (px, int(rng.integers(hz - 300, hz - 50))), (px + int(rng.integers(6, 20)), hz + 40),
                      (60, 70, 60), -1)
        cv2.circle(out, (px, int(rng.integers(hz - 350, hz - 200))), int(rng.integers(40, 120)),
                   tuple(int(c) for c in rng.integers(20, 120, 3)), -1, cv2.LINE_AA)
    for _ in range(12):  # vehicles: body, windows, wheels
        bw, bh = int(rng.integers(80, 360)), int(rng.integers(60, 220))
        vx, vy = int(rng.integers(0, w - bw)), int(rng.integers(hz - bh // 2, h - bh))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.rectangle(out, (vx, vy), (vx + bw, vy + bh), color, -1)
        cv2.rectangle(out, (vx + bw // 8, vy + bh // 8), (vx + 7 * bw // 8, vy + bh // 2), (40, 40, 50), -1)
        for wx in (vx + bw // 5, vx + 4 * bw // 5):
            cv2.circle(out, (wx, vy + bh), max(bh // 6, 4), (20, 20, 20), -1, cv2.LINE_AA)
    cv2.putText(out, "SPEED 50", (w - 420, hz - 120), cv2.FONT_HERSHEY_SIMPLEX, 2.0, (250, 250, 250), 4, cv2.LINE_AA)
    out = cv2.GaussianBlur(out, (3, 3), 0)  # optics: edges are not pixel-sharp
    noise = rng.normal(0.0, noise_sigma, out.shape).astype(np.float32)
    return np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def _decode_resize(data: np.ndarray, flag: int, size: tuple[int, int]) -> np.ndarray:
    img = cv2.imdecode(data, flag)
    if img is None:
        raise SystemExit("the synthetic JPEG did not decode")
    # The interpolation rule of perception.letterbox: area when shrinking by >= 2x, else linear.
    interp = cv2.INTER_AREA if size[0] * 2 <= img.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(img, size, interpolation=interp)


def bench_decode(runs: int, rounds: int = 5, quality: int = 90, noise_sigma: float = 4.0) -> dict[str, Any]:
    """Median / min ms of decode + resize for each path; variants run in alternating blocks."""
    frame = synthetic_frame(noise_sigma=noise_sigma)
    data = np.frombuffer(cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], np.uint8)
    cases = {
        ("640x360", "full"): (cv2.IMREAD_COLOR, (640, 360)),
        ("640x360", "reduced_2"): (cv2.IMREAD_REDUCED_COLOR_2, (640, 360)),
        ("320x180", "full"): (cv2.IMREAD_COLOR, (320, 180)),
        ("320x180", "reduced_4"): (cv2.IMREAD_REDUCED_COLOR_4, (320, 180)),
    }
    times: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
    per_block = max(runs // rounds, 1)
    # Blocks of one kind at a time, alternating: per-frame alternation thrashes the caches and
    # slows every path alike (bench_server's decode measurement saw ~1.5x).
    for _ in range(rounds):
        for key, (flag, size) in cases.items():
            _decode_resize(data, flag, size)  # warm this path's buffers
            for _ in range(per_block):
                t0 = time.perf_counter()
                _decode_resize(data, flag, size)
                times[key].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for target, reduced in (("640x360", "reduced_2"), ("320x180", "reduced_4")):
        full, red = times[(target, "full")], times[(target, reduced)]
        rows.append({
            "target": target, "reduced": reduced,
            "full_p50_ms": statistics.median(full), "reduced_p50_ms": statistics.median(red),
            "full_min_ms": min(full), "reduced_min_ms": min(red),
            "speedup_p50": statistics.median(full) / statistics.median(red), "speedup_min": min(full) / min(red),
        })
    return {"noise_sigma": noise_sigma, "jpeg_bytes": int(data.size), "quality": quality,
            "runs_per_variant": per_block * rounds,
            "cv_threads": cv2.getNumThreads(), "rows": rows}


# --- 2. NMS ---------------------------------------------------------------------------------


def clustered_candidates(
    n: int, seed: int = 0, width: float = 640.0, height: float = 384.0, classes: int = 3
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.int64]]:
    """(boxes xyxy (n, 4), scores (n,), class ids (n,)) like a dense head's raw output:
    ~100 jittered candidates around each object, 10 % of them voting another class, plus
    10 % low-score background boxes."""
    rng = np.random.default_rng(seed)
    n_bg = n // 10
    n_obj = n - n_bg
    objects = max(n_obj // 100, 1)
    ow = rng.uniform(12, 220, objects)
    oh = ow * rng.uniform(0.5, 1.6, objects)
    ocx, ocy = rng.uniform(0, width, objects), rng.uniform(0, height, objects)
    oscore, ocls = rng.uniform(0.4, 0.95, objects), rng.integers(0, classes, objects)
    which = rng.integers(0, objects, n_obj)
    jitter = rng.normal(0.0, 1.0, (n_obj, 4))
    cx = ocx[which] + 0.12 * ow[which] * jitter[:, 0]
    cy = ocy[which] + 0.12 * oh[which] * jitter[:, 1]
    bw = ow[which] * np.exp(0.15 * jitter[:, 2])
    bh = oh[which] * np.exp(0.15 * jitter[:, 3])
    # Candidates far from the object's centre score lower, as a trained head's do.
    s = oscore[which] * np.exp(-0.5 * (jitter[:, 0] ** 2 + jitter[:, 1] ** 2) / 2) + rng.normal(0, 0.02, n_obj)
    cls = np.where(rng.random(n_obj) < 0.1, rng.integers(0, classes, n_obj), ocls[which])
    bgw, bgh = rng.uniform(8, 160, n_bg), rng.uniform(8, 160, n_bg)
    bgx, bgy = rng.uniform(0, width, n_bg), rng.uniform(0, height, n_bg)
    cx, cy = np.concatenate([cx, bgx]), np.concatenate([cy, bgy])
    bw, bh = np.concatenate([bw, bgw]), np.concatenate([bh, bgh])
    s = np.concatenate([s, rng.uniform(0.01, 0.2, n_bg)])
    cls = np.concatenate([cls, rng.integers(0, classes, n_bg)])
    xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    boxes = np.clip(xyxy, 0, [width, height, width, height]).astype(np.float32)
    return boxes, np.clip(s, 0.001, 1.0).astype(np.float32), cls.astype(np.int64)


def _cv2_batched_nms(
    boxes: NDArray[np.float32], scores: NDArray[np.float32], class_ids: NDArray[np.int64], iou: float
) -> NDArray[np.int64]:
    """OpenCV's NMS on xyxy boxes (it takes x, y, w, h); the conversion is part of the cost."""
    xywh = np.empty(boxes.shape, np.float64)
    xywh[:, :2] = boxes[:, :2]
    xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
    # score_threshold 0: keep every candidate (all scores are > 0), as batched_nms does.
    # The stubs say Sequence; numpy arrays are accepted too and skip a list copy.
    keep = cv2.dnn.NMSBoxesBatched(
        xywh, scores.astype(np.float64), class_ids.astype(np.int32), 0.0, iou)  # type: ignore[arg-type]  # stubs: Sequence only
    return np.asarray(keep, np.int64).reshape(-1)


def bench_nms(runs: int, sizes: tuple[int, ...] = (4000, 1000, 300), iou: float = 0.5) -> dict[str, Any]:
    from perception.nms import batched_nms

    boxes, scores, cls = clustered_candidates(sizes[0])
    order = np.argsort(-scores, kind="stable")
    rows = []
    for n in sizes:
        # The smaller sets are the top-n by score of the big one: what a pre-NMS top-k leaves.
        idx = order[:n]
        b, s, c = boxes[idx], scores[idx], cls[idx]
        impls: dict[str, Callable[[], NDArray[np.int64]]] = {
            "numpy": partial(batched_nms, b, s, c, iou),
            "opencv": partial(_cv2_batched_nms, b, s, c, iou),
        }
        kept = {name: f() for name, f in impls.items()}  # also the warm-up
        t: dict[str, list[float]] = {name: [] for name in impls}
        for r in range(runs):
            for name in sorted(impls, reverse=bool(r % 2)):  # alternate who goes first
                t0 = time.perf_counter()
                impls[name]()
                t[name].append((time.perf_counter() - t0) * 1e3)
        a, o = kept["numpy"], kept["opencv"]
        sa, so = set(a.tolist()), set(o.tolist())
        rows.append({
            "candidates": n, "kept_numpy": len(a), "kept_opencv": len(o), "same_set": sa == so,
            "same_order": bool(len(a) == len(o) and np.array_equal(a, o)),
            "only_numpy": sorted(sa - so)[:10], "only_opencv": sorted(so - sa)[:10],
            "numpy_p50_ms": statistics.median(t["numpy"]), "opencv_p50_ms": statistics.median(t["opencv"]),
            "numpy_min_ms": min(t["numpy"]), "opencv_min_ms": min(t["opencv"]),
            "ratio_p50": statistics.median(t["numpy"]) / statistics.median(t["opencv"]),
            "ratio_min": min(t["numpy"]) / min(t["opencv"]),
        })
    return {"iou_threshold": iou, "classes": int(cls.max()) + 1, "runs": runs, "rows": rows}


# --- 3. INT8 activations --------------------------------------------------------------------


def export_tiny_detector(activation: str, path: Path, seed: int = 0) -> None:
    """An 8-layer Conv(+BN folded)+activation stride-16 detector-like model, FP32 ONNX opset 17."""
    import torch
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    torch.manual_seed(seed)
    act: type[nn.Module] = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish}[activation]
    # (in, out, stride): stem, then stride-2 / stride-1 pairs, a YOLO-nano-like width.
    plan = ((3, 16, 2), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1))
    layers: list[nn.Module] = []
    for cin, cout, stride in plan:
        conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        bn = nn.BatchNorm2d(cout)
        with torch.no_grad():  # non-trivial statistics, so the folded weights look trained
            bn.running_mean = torch.empty(cout).uniform_(-0.5, 0.5)
            bn.running_var = torch.empty(cout).uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
        layers += [fuse_conv_bn_eval(conv.eval(), bn.eval()), act()]
    layers.append(nn.Conv2d(128, 4 + 1 + 3, 1))  # box, objectness, 3 classes per cell
    model = nn.Sequential(*layers).eval()
    x = torch.rand(1, 3, *INPUT_HW)
    with warnings.catch_warnings():  # "legacy TorchScript-based export": chosen on purpose, below
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["preds"], opset_version=17,
                          dynamo=False)  # the dynamo exporter needs onnxscript, not installed


def quantize(fp32: Path, out: Path, activation_type: str, batches: int, seed: int = 0) -> None:
    """Static QDQ INT8: per-channel S8 weights, MinMax ranges from random batches."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    rng = np.random.default_rng(seed)
    data = [rng.random((1, 3, *INPUT_HW), dtype=np.float32) for _ in range(batches)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(data)

        def get_next(self) -> dict[str, NDArray[np.float32]] | None:
            x = next(self._it, None)
            return None if x is None else {"images": x}

    prepped = out.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=True)
    quantize_static(
        str(prepped), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type={"u8": QuantType.QUInt8, "s8": QuantType.QInt8}[activation_type],
        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
    )


def bench_int8(runs: int, warmup: int, calib_batches: int) -> dict[str, Any]:
    import onnxruntime as ort

    x = np.random.default_rng(1).random((1, 3, *INPUT_HW), dtype=np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_kernels_") as tmp:
        for act in ACTIVATIONS:
            _log(f"int8: export + quantize ({act})")
            paths = {"fp32": Path(tmp) / f"{act}_fp32.onnx"}
            export_tiny_detector(act, paths["fp32"])
            for at in ("u8", "s8"):
                paths[f"int8_{at}"] = Path(tmp) / f"{act}_{at}.onnx"
                quantize(paths["fp32"], paths[f"int8_{at}"], at, calib_batches)
            sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
                        for k, p in paths.items()}
            names = list(sessions)
            for _ in range(warmup):
                for k in names:
                    sessions[k].run(None, {"images": x})
            _log(f"int8: timing {act}, {runs} round-robin runs of {', '.join(names)}")
            t: dict[str, list[float]] = {k: [] for k in names}
            for r in range(runs):
                for k in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
                    t0 = time.perf_counter()
                    sessions[k].run(None, {"images": x})
                    t[k].append((time.perf_counter() - t0) * 1e3)
            p50 = {k: statistics.median(v) for k, v in t.items()}
            mn = {k: min(v) for k, v in t.items()}
            rows.append({"activation": act, **{f"{k}_p50_ms": p50[k] for k in names},
                         **{f"{k}_min_ms": mn[k] for k in names},
                         **{f"{k}_ratio_p50": p50[k] / p50["fp32"] for k in names if k != "fp32"},
                         **{f"{k}_ratio_min": mn[k] / mn["fp32"] for k in names if k != "fp32"}})
            del sessions
    return {"input": f"1x3x{INPUT_HW[0]}x{INPUT_HW[1]}", "runs": runs, "threads": 1,
            "calibration_batches": calib_batches, "onnxruntime": ort.__version__, "rows": rows}


# --- CLI ------------------------------------------------------------------------------------


def bench_formats(runs: int) -> list[dict[str, Any]]:
    """p50 ms of ``decode_encoded`` per size and format, interleaved round robin."""
    from perception.decode import DecodeLimits, decode_encoded

    limits = DecodeLimits(max_full_buffer_pixels=3840 * 2160)
    min_size = (INPUT_HW[1], INPUT_HW[0])
    rows = []
    for w, h in ((1280, 720), (1920, 1080), (3840, 2160)):
        img = synthetic_frame(w, h, seed=7)
        data = {
            "baseline": cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes(),
            "progressive": cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90,
                                                      cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
            "png": cv2.imencode(".png", img)[1].tobytes(),
        }
        times: dict[str, list[float]] = {k: [] for k in data}
        for k in data:
            decode_encoded(data[k], min_size, limits)  # warm
        for _ in range(runs):
            for k, b in data.items():
                t0 = time.perf_counter()
                decode_encoded(b, min_size, limits)
                times[k].append((time.perf_counter() - t0) * 1000)
        rows.append({"size": f"{w}x{h}", **{f"{k}_p50_ms": statistics.median(v) for k, v in times.items()},
                     **{f"{k}_kb": len(b) // 1024 for k, b in data.items()}})
    return rows


def _interleaved(kernels: dict[str, Callable[[], Any]], runs: int, rounds: int, unit: float) -> dict[str, list[float]]:
    """Each kernel's run times (seconds x ``unit``), ``runs`` each, in ``rounds`` interleaved blocks
    so that load from other jobs hits every kernel alike."""
    times: dict[str, list[float]] = {k: [] for k in kernels}
    for _ in range(rounds):
        for k, fn in kernels.items():
            for _ in range(runs // rounds):
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * unit)
    return times


def _normalize_strided(canvas: NDArray[np.uint8], scale: np.float32, out: NDArray[np.float32]) -> None:
    """The normalisation before: one multiply of the channel-reversed, transposed view."""
    np.multiply(canvas[:, :, ::-1].transpose(2, 0, 1), scale, out=out, casting="unsafe")


def bench_normalize(runs: int, rounds: int = 5) -> dict[str, Any]:
    """p50 / min ms of the strided multiply vs ``normalize_into`` (RGB, 1/255), interleaved in blocks."""
    from perception.manifest import PreprocessSpec
    from perception.preprocess import normalize_into

    w, h = 512, 288
    spec = PreprocessSpec(w, h, color_order="RGB", scale=1 / 255)
    canvas: NDArray[np.uint8] = np.ascontiguousarray(cv2.resize(synthetic_frame(1280, 720, seed=3), (w, h)), np.uint8)
    a, b = np.empty((3, h, w), np.float32), np.empty((3, h, w), np.float32)
    scale = np.float32(spec.scale)
    kernels: dict[str, Callable[[], None]] = {"strided": partial(_normalize_strided, canvas, scale, a),
                                              "split": partial(normalize_into, canvas, spec, b)}
    times = _interleaved(kernels, runs, rounds, 1e3)
    return {"input": f"{w}x{h}", "same": bool(np.array_equal(a, b)),
            **{f"{k}_p50_ms": statistics.median(v) for k, v in times.items()},
            **{f"{k}_min_ms": min(v) for k, v in times.items()}}


def _box_iou_broadcast(a: NDArray[np.floating], b: NDArray[np.floating]) -> NDArray[np.float32]:
    """box_iou before: (N, 1, 2) corner pairs broadcast against (1, M, 2)."""
    from perception.boxes import box_area

    a = np.asarray(a, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0).astype(np.float32)


def bench_iou(runs: int, sizes: tuple[int, ...] = (10, 50, 100), rounds: int = 5) -> list[dict[str, Any]]:
    """p50 / min us of the two box_iou forms, and of box_iou against the tracker's compiled
    loop, on seeded boxes (degenerate ones included), interleaved."""
    from perception.boxes import box_iou
    from perception.tracking.kernels import pairwise_iou

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        a, b = (rng.random((n, 4)) * 400).astype(np.float64), (rng.random((n, 4)) * 400).astype(np.float64)
        a[: n // 2, 2:] += a[: n // 2, :2]  # half the boxes well formed, half possibly inverted
        b[: n // 2, 2:] += b[: n // 2, :2]
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        pairwise_iou(a32, b32)  # compiled (or loaded) before the timing

        kernels: dict[str, Callable[[], Any]] = {"broadcast": partial(_box_iou_broadcast, a, b),
                                                 "columns": partial(box_iou, a, b),
                                                 "compiled": partial(pairwise_iou, a32, b32)}
        times = _interleaved(kernels, runs, rounds, 1e6)
        rows.append({"boxes": n, "same": bool(np.array_equal(_box_iou_broadcast(a, b), box_iou(a, b))),
                     "compiled_same": bool(np.array_equal(pairwise_iou(a32, b32), box_iou(a, b))),
                     **{f"{k}_p50_us": statistics.median(v) for k, v in times.items()},
                     **{f"{k}_min_us": min(v) for k, v in times.items()}})
    return rows


_ECHO_SERVER = """
import struct, sys, time
from concurrent import futures
import grpc
answer = bytes(700)
wait_s = float(sys.argv[1])
def ident(b): return b
def unary(req, ctx): return answer
def wait(req, ctx):  # sleeps, then answers how long it took (its first 8 bytes)
    t0 = time.perf_counter()
    time.sleep(wait_s)
    return struct.pack("d", time.perf_counter() - t0) + answer[8:]
def stream(reqs, ctx):
    for _ in reqs:
        yield answer
handlers = {"U": grpc.unary_unary_rpc_method_handler(unary, request_deserializer=ident, response_serializer=ident),
            "W": grpc.unary_unary_rpc_method_handler(wait, request_deserializer=ident, response_serializer=ident),
            "S": grpc.stream_stream_rpc_method_handler(stream, request_deserializer=ident, response_serializer=ident)}
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", handlers),))
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
sys.stdin.read()
"""


def bench_grpc_floor(calls: int, size: int = 100_000, wait_ms: float = 7.0) -> dict[str, Any]:
    """p50 ms of a bare grpcio round trip (unary, stream lockstep) to a server process; and the
    time a unary call spends outside a handler that sleeps ``wait_ms`` (as a frame's work would
    keep it), for a quarter as many calls."""
    import queue as queue_mod
    import struct
    import subprocess

    import grpc

    proc = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER, str(wait_ms / 1e3)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        payload = bytes(size)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            ident: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
            unary = ch.unary_unary("/echo.Echo/U", request_serializer=ident, response_deserializer=ident)
            warm = calls // 10
            times: dict[str, list[float]] = {"unary": [], "stream": []}
            for i in range(calls + warm):
                t0 = time.perf_counter()
                unary(payload)
                if i >= warm:
                    times["unary"].append((time.perf_counter() - t0) * 1e3)
            wait = ch.unary_unary("/echo.Echo/W", request_serializer=ident, response_deserializer=ident)
            times["outside_waiting_handler"] = []
            for i in range(max(1, calls // 4) + warm):
                t0 = time.perf_counter()
                (inside,) = struct.unpack_from("d", wait(payload))
                if i >= warm:
                    times["outside_waiting_handler"].append((time.perf_counter() - t0 - inside) * 1e3)
            sends: queue_mod.Queue[bytes | None] = queue_mod.Queue()
            answers = ch.stream_stream("/echo.Echo/S", request_serializer=ident,
                                       response_deserializer=ident)(iter(sends.get, None))
            for i in range(calls + warm):
                t0 = time.perf_counter()
                sends.put(payload)
                next(answers)
                if i >= warm:
                    times["stream"].append((time.perf_counter() - t0) * 1e3)
            sends.put(None)
            for _ in answers:
                pass
    finally:
        proc.kill()
        proc.wait()
    return {"request_bytes": size, "calls": calls, "grpcio": grpc.__version__, "wait_ms": wait_ms,
            **{f"{k}_p50_ms": statistics.median(v) for k, v in times.items()}}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=PARTS, help="run only these measurements (default: all)")
    p.add_argument("--decode-runs", type=int, default=100, help="decode + resize runs per variant")
    p.add_argument("--nms-runs", type=int, default=50, help="NMS runs per implementation and size")
    p.add_argument("--int8-runs", type=int, default=30, help="timed round-robin runs per model")
    p.add_argument("--int8-warmup", type=int, default=5)
    p.add_argument("--calib-batches", type=int, default=8, help="random calibration batches for INT8")
    p.add_argument("--format-runs", type=int, default=10, help="decode runs per size and format")
    p.add_argument("--normalize-runs", type=int, default=2000, help="normalisation runs per variant")
    p.add_argument("--grpc-calls", type=int, default=2000, help="timed calls per gRPC floor measurement")
    p.add_argument("--iou-runs", type=int, default=2000, help="box IoU runs per form and size")
    p.add_argument("--cv-threads", type=int, help="cv2.setNumThreads (default: OpenCV's own, as the server runs)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    which = set(a.only or PARTS)
    if a.cv_threads is not None:
        cv2.setNumThreads(a.cv_threads)
    results: dict[str, Any] = {"cpu": cpu_model(), "opencv": cv2.__version__, "numpy": np.__version__}
    print(f"CPU: {results['cpu']}; OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads), numpy {np.__version__}")
    if "decode" in which:
        # Two frames: DCT scaling skips inverse-DCT, upsampling and colour work, not the entropy
        # decode, so the gain depends on how many bytes the frame is; the noise sets that.
        results["decode"] = []
        print("\n1. decode a 1920x1080 JPEG + resize (INTER_AREA when shrinking >= 2x, else linear), "
              f"full vs DCT-reduced, {a.decode_runs} runs each")
        print(f"{'frame':<26} {'to':<8} {'reduced':<10} {'full p50':>9} {'reduced p50':>12} {'speedup p50':>12} "
              f"{'min full/reduced':>17}")
        for sigma in (4.0, 0.0):
            _log(f"decode (noise sigma {sigma})")
            d = bench_decode(a.decode_runs, noise_sigma=sigma)
            results["decode"].append(d)
            frame = f"noise {sigma:g}, q{d['quality']}, {d['jpeg_bytes'] // 1024} KB"
            for r in d["rows"]:
                print(f"{frame:<26} {r['target']:<8} {r['reduced']:<10} {r['full_p50_ms']:>6.2f} ms "
                      f"{r['reduced_p50_ms']:>9.2f} ms {r['speedup_p50']:>11.2f}x "
                      f"{r['full_min_ms']:>6.2f}/{r['reduced_min_ms']:.2f} = {r['speedup_min']:.2f}x")
    if "nms" in which:
        _log("nms")
        results["nms"] = n = bench_nms(a.nms_runs)
        print(f"\n2. batched NMS, IoU {n['iou_threshold']}, {n['classes']} classes, {n['runs']} runs each: "
              f"perception.nms (numpy) vs cv2.dnn.NMSBoxesBatched (C++)")
        print(f"{'cands':>6} {'numpy p50':>10} {'opencv p50':>11} {'ratio p50':>10} {'ratio min':>10} {'kept':>9}  "
              "same set")
        for r in n["rows"]:
            same = "yes" if r["same_set"] else f"NO (only numpy {r['only_numpy']}, only opencv {r['only_opencv']})"
            if r["same_set"] and not r["same_order"]:
                same += " (order differs)"
            print(f"{r['candidates']:>6} {r['numpy_p50_ms']:>7.3f} ms {r['opencv_p50_ms']:>8.3f} ms "
                  f"{r['ratio_p50']:>9.2f}x {r['ratio_min']:>9.2f}x {r['kept_numpy']:>4}/{r['kept_opencv']:<4}  {same}")
    if "int8" in which:
        results["int8"] = q = bench_int8(a.int8_runs, a.int8_warmup, a.calib_batches)
        print(f"\n3. INT8 QDQ (per-channel S8 weights, MinMax) vs FP32, 8-layer conv model {q['input']}, onnxruntime "
              f"{q['onnxruntime']}, {q['threads']} thread, {q['runs']} round-robin runs")
        print(f"{'activation':<10} {'fp32 p50':>9} {'U8 p50':>8} {'S8 p50':>8}  {'U8/fp32 p50, min':>17}  "
              f"{'S8/fp32 p50, min':>17}")
        for r in q["rows"]:
            print(f"{r['activation']:<10} {r['fp32_p50_ms']:>6.2f} ms {r['int8_u8_p50_ms']:>5.2f} ms "
                  f"{r['int8_s8_p50_ms']:>5.2f} ms  {r['int8_u8_ratio_p50']:>7.2f}x, {r['int8_u8_ratio_min']:.2f}x  "
                  f"{r['int8_s8_ratio_p50']:>8.2f}x, {r['int8_s8_ratio_min']:.2f}x")
    if "formats" in which:
        _log("formats")
        results["formats"] = rows = bench_formats(a.format_runs)
        print(f"\n4. decode cost by format to a {INPUT_HW[1]}x{INPUT_HW[0]} input (perception.decode), "
              f"p50 of {a.format_runs} runs; progressive JPEG and PNG decode at full size")
        print(f"{'size':<10} {'baseline JPEG':>22} {'progressive JPEG':>22} {'PNG':>22}")
        for r in rows:
            cells = [f"{r[k + '_p50_ms']:.1f} ms ({r[k + '_kb']} KB)" for k in ("baseline", "progressive", "png")]
            print(f"{r['size']:<10} " + " ".join(f"{c:>22}" for c in cells))
    if "normalize" in which:
        _log("normalize")
        results["normalize"] = r = bench_normalize(a.normalize_runs)
        print(f"\n5. normalise a {r['input']} uint8 canvas to float CHW (RGB, 1/255), {a.normalize_runs} runs each")
        print(f"strided multiply p50 {r['strided_p50_ms']:.3f} ms (min {r['strided_min_ms']:.3f}); "
              f"split + per-plane multiply p50 {r['split_p50_ms']:.3f} ms (min {r['split_min_ms']:.3f}); "
              f"ratio p50 {r['split_p50_ms'] / r['strided_p50_ms']:.2f}x; "
              f"same to the bit: {'yes' if r['same'] else 'NO'}")
    if "grpc" in which:
        _log("grpc")
        results["grpc"] = g = bench_grpc_floor(a.grpc_calls)
        print(f"\n6. bare grpcio {g['grpcio']} round trip, {g['request_bytes'] // 1000} KB request, 700 B answer, "
              f"server in another process, {g['calls']} calls: unary p50 {g['unary_p50_ms']:.3f} ms, "
              f"stream lockstep p50 {g['stream_p50_ms']:.3f} ms; unary to a handler that sleeps {g['wait_ms']:g} ms "
              f"({max(1, g['calls'] // 4)} calls): p50 {g['outside_waiting_handler_p50_ms']:.3f} ms "
              "outside the handler")
    if "iou" in which:
        _log("iou")
        results["iou"] = rows = bench_iou(a.iou_runs)
        print(f"\n7. box IoU matrix N x N (perception.boxes.box_iou), {a.iou_runs} runs each: (N, 1, 2) pairs "
              "broadcast (before) vs coordinate columns (now)")
        print(f"{'N':>4} {'broadcast p50':>14} {'columns p50':>12} {'ratio p50':>10} {'ratio min':>10}  "
              "same to the bit")
        for r in rows:
            print(f"{r['boxes']:>4} {r['broadcast_p50_us']:>11.1f} us {r['columns_p50_us']:>9.1f} us "
                  f"{r['columns_p50_us'] / r['broadcast_p50_us']:>9.2f}x "
                  f"{r['columns_min_us'] / r['broadcast_min_us']:>9.2f}x  {'yes' if r['same'] else 'NO'}")
        print("box_iou (NumPy) vs the tracker's compiled loop (perception.tracking.kernels.pairwise_iou)")
        print(f"{'N':>4} {'NumPy p50':>14} {'compiled p50':>12} {'ratio p50':>10} {'ratio min':>10}  "
              "same to the bit")
        for r in rows:
            print(f"{r['boxes']:>4} {r['columns_p50_us']:>11.1f} us {r['compiled_p50_us']:>9.1f} us "
                  f"{r['compiled_p50_us'] / r['columns_p50_us']:>9.2f}x "
                  f"{r['compiled_min_us'] / r['columns_min_us']:>9.2f}x  {'yes' if r['compiled_same'] else 'NO'}")
    print("(p50 swings with other jobs on a shared machine; min is the least-disturbed run)")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
