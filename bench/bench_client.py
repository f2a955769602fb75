"""Client benchmarks, measured side by side in one run against one ``perception serve``.

1. One camera at max rate: unary Detect vs StreamDetect with a window of 1 (lock-step), 2
   and 4 frames in flight: answered fps and client round-trip p50 / p99.
2. The same 1280x720 frames sent as the recorded JPEG bytes vs as raw BGR pixels (what a
   client that decodes first would send): bytes per frame and round-trip p50.
3. Replay pacing accuracy with no server in the way: how late each frame of a 3-camera,
   10 fps recording leaves in real-time mode (p50 / p99 / max, ms).

    .venv/bin/python -m bench.bench_client [--model manifest.json | --tiny] [--frames 200] [--json-out FILE]

Without --model it serves the model users get (the demo's build of the shipped default,
artifacts/demo/engine, built now if `make demo` has not run); --tiny serves a tiny
random-weight ONNX detector instead, to see the plumbing's cost alone.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"ready grpc=(\S+):(\d+) metrics=")


def _scene(i: int, w: int = 1280, h: int = 720) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2] = (200, 160, 120)
    img[h // 2 :] = (80, 80, 80)
    for _ in range(8):
        x, y = int(rng.integers(0, w - 200)), int(rng.integers(h // 3, h - 150))
        cv2.rectangle(img, (x, y), (x + int(rng.integers(60, 200)), y + int(rng.integers(40, 140))),
                      tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
    return cv2.add(img, rng.integers(0, 20, img.shape, dtype=np.uint8))


def start_server(model: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """``perception serve`` on a loopback port 0 (plus ``extra`` flags); (process, address) once ready."""
    cmd = [sys.executable, "-m", "perception.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "0", "--threads", "1", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    stderr = proc.stderr
    assert stderr is not None  # stderr=PIPE
    deadline = time.monotonic() + 120
    for line in stderr:
        m = READY.search(line)
        if m:
            threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()  # keep the pipe drained
            return proc, f"{m.group(1)}:{m.group(2)}"
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("server did not become ready")


def _pct(v: list[float]) -> dict[str, float]:
    a = np.asarray(v)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3)}


def bench_modes(address: str, frames: list[Any]) -> dict[str, dict[str, Any]]:
    from client.config import ClientConfig
    from client.detector_client import DetectorClient

    out: dict[str, dict[str, Any]] = {}
    with DetectorClient(ClientConfig(targets=(address,))) as client:
        for f in frames[:10]:
            client.detect(f)  # warm the channel and the server
        lat = []
        t0 = time.perf_counter()
        for f in frames:
            lat.append(client.detect(f).latency_ms)
        out["unary"] = {"fps": round(len(frames) / (time.perf_counter() - t0), 1), **_pct(lat)}
    for window in (1, 2, 4):
        out[f"stream_w{window}"] = bench_stream(address, frames, window)
    return out


def bench_stream(address: str, frames: list[Any], window: int) -> dict[str, Any]:
    """One StreamDetect session with ``window`` frames in flight: answered fps and OK latency."""
    from client.config import ClientConfig
    from client.detector_client import DetectorClient

    with DetectorClient(ClientConfig(targets=(address,), window=window)) as client:
        got: list[Any] = []
        t0 = time.perf_counter()
        with client.stream(lambda fr, r: got.append(r)) as s:
            for f in frames:
                s.send(f)
        dt = time.perf_counter() - t0
        ok = [r.latency_ms for r in got if r.status.value == "OK"]
        return {"fps": round(len(got) / dt, 1), "answered_ok": len(ok), **_pct(ok)}


def bench_payload(address: str, n: int) -> dict[str, dict[str, Any]]:
    from client.config import ClientConfig
    from client.detector_client import DetectorClient
    from client.frames import SourceFrame
    from client.sources.images import bgr_frame

    imgs = [_scene(i) for i in range(n)]
    jpeg = [SourceFrame("front", i, i, encoded=cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
            for i, im in enumerate(imgs)]
    raw = [bgr_frame("front", i, i, im) for i, im in enumerate(imgs)]
    out = {}
    with DetectorClient(ClientConfig(targets=(address,))) as client:
        for name, frames in (("jpeg_as_is", jpeg), ("raw_bgr", raw)):
            client.detect(frames[0])
            lat = [client.detect(f).latency_ms for f in frames]
            out[name] = {"bytes_per_frame": int(np.mean([f.nbytes for f in frames])), **_pct(lat)}
    return out


def bench_pacing(seconds: float = 3.0) -> dict[str, float]:
    from client.frames import SourceFrame
    from client.pacing import Pacing, paced

    n = int(seconds * 10)
    frames = [SourceFrame(c, i, i * 100_000_000 + k * 7_000_000, encoded=b"\xff\xd8")
              for i in range(n) for k, c in enumerate(("front", "left", "right"))]
    late = []
    t0 = time.monotonic()
    for f in paced(frames, Pacing(speed=1.0)):
        late.append((time.monotonic() - t0 - f.timestamp_ns / 1e9) * 1e3)
    a = np.asarray(late)
    return {"late_ms_p50": round(float(np.percentile(a, 50)), 3), "late_ms_p99": round(float(np.percentile(a, 99)), 3),
            "late_ms_max": round(float(a.max()), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="manifest.json to serve (default: the shipped default model)")
    p.add_argument("--tiny", action="store_true", help="serve a tiny random-weight model: the plumbing's cost alone")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None and args.tiny:
            from tests.tiny_model import make_tiny_artifact

            model = make_tiny_artifact(Path(tmp) / "tiny")
        elif model is None:
            from bench.bench_server import shipped_model

            model = shipped_model(Path(tmp))
        proc, address = start_server(model)
        try:
            small = [_scene(i, 640, 360) for i in range(8)]
            from client.frames import SourceFrame

            frames = [SourceFrame("front", i, i * 33_000_000,
                                  encoded=cv2.imencode(".jpg", small[i % 8])[1].tobytes()) for i in range(args.frames)]
            results: dict[str, Any] = {"modes_640x360_jpeg": bench_modes(address, frames)}
            results["payload_1280x720"] = bench_payload(address, max(20, args.frames // 5))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    results["pacing_3cam_10fps"] = bench_pacing()
    m = results["modes_640x360_jpeg"]
    pl = results["payload_1280x720"]
    results["ratios"] = {
        "stream_w2_fps_over_unary": round(m["stream_w2"]["fps"] / m["unary"]["fps"], 2),
        "stream_w1_p50_over_unary_p50": round(m["stream_w1"]["p50"] / m["unary"]["p50"], 2),
        "raw_p50_over_jpeg_p50": round(pl["raw_bgr"]["p50"] / pl["jpeg_as_is"]["p50"], 2),
        "raw_bytes_over_jpeg_bytes": round(pl["raw_bgr"]["bytes_per_frame"] / pl["jpeg_as_is"]["bytes_per_frame"], 1),
    }
    print(json.dumps(results, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
