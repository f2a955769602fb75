"""Same-host frame transports for 1080p frames: JPEG over gRPC vs raw BGR over gRPC vs shared memory.

One ``perception serve`` (a subprocess, ``--shm-allow perception-bench-``) on loopback; one
``StreamDetect`` call per transport, lock-step (the next frame is sent once the previous is
answered), so each frame's round trip is measured alone:

- ``jpeg``: the client encodes each BGR frame (quality 90) and sends the bytes; the server
  decodes (at reduced scale when the model input is much smaller: libjpeg DCT scaling);
- ``raw``: the BGR pixels in a ``RawImage`` (client ``tobytes`` + protobuf copies, 6.2 MB
  through the socket, the server parses and letterboxes);
- ``shm``: the client copies the frame into a ``ShmRing`` slot and sends a ``SharedMemoryRef``;
  the server ``pread``s the slot (one copy) and letterboxes.

Per frame: round trip p50 / p95 (ms) from the moment the client has the BGR frame (encode /
copy included) to its answer; client CPU (``time.process_time`` of this process, every thread:
gRPC's included) and server CPU (utime + stime of the server process from
``/proc/<pid>/stat``) over the measured frames, divided by their count; the server's own
pre-processing time (p50 of ``timings.preprocess_us``: the pipeline's decode + letterbox; the
protobuf parse of a raw frame and the slot copy of a shm frame come before it and are not in
it, only in the server CPU). Frames
are ``assets/drives/demo/front.mp4`` resized to 1920x1080. Transports run in alternating
rounds so that drift of the machine hits each alike.

Then raw frames flat out (``--flat-out-s``, 0 to skip): one stream keeping ``window`` (4) raw
1080p frames in flight, as a camera node sending ``--encode raw`` does when the server is the
bottleneck, against a server with the default ``--max-stream-inflight-bytes`` (4 MiB: a 6.2 MB
frame is read only once the one before it is answered) and one with it raised to 64 MiB (every
frame of the window read at once, as before that bound), alternating. Per run: OK frames/s,
and the p50 from handing a frame to gRPC to its answer.

    .venv/bin/python -m bench.bench_shm [--model manifest.json | --tiny] [--frames 300] [--rounds 3] [--json]
        [--flat-out-s 10]

Without --model the model users get is served (artifacts/demo/engine, built now if `make demo`
has not run); --tiny serves a tiny random-weight ONNX detector (64x48 input) instead, to see the
transport's cost alone. Linux only (/dev/shm, /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

REPO = Path(__file__).resolve().parents[1]
VIDEO = REPO / "assets" / "drives" / "demo" / "front.mp4"
PREFIX = "perception-bench-"
TRANSPORTS = ("jpeg", "raw", "shm")
_TICK = os.sysconf("SC_CLK_TCK")


def load_frames(path: Path = VIDEO, size: tuple[int, int] = (1920, 1080), limit: int = 60) -> list[NDArray[np.uint8]]:
    cap = cv2.VideoCapture(str(path))
    frames: list[NDArray[np.uint8]] = []
    try:
        while len(frames) < limit:
            ok, img = cap.read()
            if not ok:
                break
            if (img.shape[1], img.shape[0]) != size:
                img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
            frames.append(np.ascontiguousarray(img, np.uint8))
    finally:
        cap.release()
    if not frames:
        raise SystemExit(f"no frames in {path}")
    return frames


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # fields 14 and 15 of proc(5), after "pid (comm)"


class LockStep:
    """One StreamDetect call: ``ask(request)`` sends one frame and returns its answer."""

    def __init__(self, stub: Any) -> None:
        self._q: queue.Queue[Any] = queue.Queue()
        self._call = stub.StreamDetect(iter(self._q.get, None), timeout=3600)

    def ask(self, request: Any) -> Any:
        self._q.put(request)
        return next(self._call)

    def close(self) -> None:
        self._q.put(None)
        for _ in self._call:
            pass


def _requests(transport: str, ring: Any) -> Callable[[int, NDArray[np.uint8]], Any]:
    from client.convert import shm_ref
    from perception.v1 import detector_pb2 as pb

    def make(seq: int, img: NDArray[np.uint8]) -> Any:
        frame = pb.Frame(camera_id="front", sequence=seq, capture_timestamp_ns=seq)
        if transport == "jpeg":
            frame.encoded = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        elif transport == "raw":
            frame.raw.CopyFrom(pb.RawImage(width=img.shape[1], height=img.shape[0], format=pb.PIXEL_FORMAT_BGR8,
                                           data=img.tobytes()))
        else:
            frame.shm.CopyFrom(shm_ref(ring.write(img)))
        return pb.DetectRequest(frame=frame)

    return make


def run_round(streams: dict[str, LockStep], ring: Any, frames: list[NDArray[np.uint8]], n: int, first_seq: int,
              server_pid: int, acc: dict[str, dict[str, list[float]]]) -> None:
    for transport in TRANSPORTS:
        make = _requests(transport, ring)
        stream = streams[transport]
        a = acc[transport]
        c0, s0 = time.process_time(), cpu_seconds(server_pid)
        for i in range(n):
            img = frames[i % len(frames)]
            t0 = time.perf_counter()
            resp = stream.ask(make(first_seq + i, img))
            a["rtt_ms"].append((time.perf_counter() - t0) * 1e3)
            a["prep_ms"].append(resp.timings.preprocess_us / 1e3)
            if resp.status != 1:  # FRAME_STATUS_OK
                a["not_ok"].append(1.0)
                if len(a["not_ok"]) == 1:
                    print(f"{transport}: frame answered {resp.status}: {resp.message}", file=sys.stderr)
        a["client_cpu_s"].append(time.process_time() - c0)
        a["server_cpu_s"].append(cpu_seconds(server_pid) - s0)
        a["frames"].append(float(n))
        a["bytes"].append(float(len(make(0, frames[0]).SerializeToString())))


def bench(address: str, server_pid: int, frames: list[NDArray[np.uint8]], total: int, rounds: int,
          warmup: int = 10) -> dict[str, dict[str, Any]]:
    import grpc

    from client.shm_ring import ShmRing
    from perception.v1 import detector_pb2_grpc as pb_grpc

    acc: dict[str, dict[str, list[float]]] = {
        t: {k: [] for k in ("rtt_ms", "prep_ms", "client_cpu_s", "server_cpu_s", "frames", "not_ok", "bytes")}
        for t in TRANSPORTS}
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20),
                                                      ("grpc.max_receive_message_length", 64 << 20)])
    # Lock-step: one frame in flight, two slots are plenty (the server copied the previous one out).
    with channel, ShmRing(slots=4, slot_bytes=frames[0].nbytes, prefix=PREFIX) as ring:
        stub = pb_grpc.DetectorStub(channel)
        streams = {t: LockStep(stub) for t in TRANSPORTS}
        try:
            warm: dict[str, dict[str, list[float]]] = {t: {k: [] for k in acc[t]} for t in TRANSPORTS}
            run_round(streams, ring, frames, warmup, 0, server_pid, warm)
            per = max(1, total // rounds)
            for r in range(rounds):
                run_round(streams, ring, frames, per, warmup + r * per, server_pid, acc)
        finally:
            for s in streams.values():
                s.close()
    out: dict[str, dict[str, Any]] = {}
    for t in TRANSPORTS:
        a = acc[t]
        n = sum(a["frames"])
        rtt = np.asarray(a["rtt_ms"])
        out[t] = {
            "frames": int(n),
            "not_ok": int(sum(a["not_ok"])),
            "request_bytes": int(a["bytes"][0]),
            "rtt_ms_p50": round(float(np.percentile(rtt, 50)), 3),
            "rtt_ms_p95": round(float(np.percentile(rtt, 95)), 3),
            "server_prep_ms_p50": round(float(np.percentile(a["prep_ms"], 50)), 3),
            "client_cpu_ms_per_frame": round(sum(a["client_cpu_s"]) / n * 1e3, 3),
            "server_cpu_ms_per_frame": round(sum(a["server_cpu_s"]) / n * 1e3, 3),
        }
        out[t]["total_cpu_ms_per_frame"] = round(out[t]["client_cpu_ms_per_frame"]
                                                 + out[t]["server_cpu_ms_per_frame"], 3)
    return out


def flat_out_raw(model: Path, frames: list[NDArray[np.uint8]], seconds: float, inflight: int,
                 window: int = 4) -> dict[str, float]:
    """One stream of raw frames, ``window`` in flight, for ``seconds`` after a 2 s ramp-up,
    against a server with ``--max-stream-inflight-bytes inflight``."""
    import threading

    import grpc

    from bench.bench_client import start_server
    from perception.v1 import detector_pb2_grpc as pb_grpc

    proc, address = start_server(model, "--max-stream-inflight-bytes", str(inflight))
    make = _requests("raw", None)
    requests = [make(0, img) for img in frames[:8]]  # built once: the client's copies are not measured
    credits = threading.Semaphore(window)
    sent_at: dict[int, float] = {}
    start, stop_at = time.perf_counter() + 2.0, time.perf_counter() + 2.0 + seconds
    ok, latencies = 0, []

    def gen() -> Any:
        seq = 0
        while time.perf_counter() < stop_at:
            credits.acquire()
            req = requests[seq % len(requests)]
            req.frame.sequence = seq
            sent_at[seq] = time.perf_counter()
            yield req
            seq += 1

    try:
        with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20),
                                                     ("grpc.max_receive_message_length", 64 << 20)]) as ch:
            for resp in pb_grpc.DetectorStub(ch).StreamDetect(gen(), timeout=seconds + 60):
                credits.release()
                now = time.perf_counter()
                if start <= now <= stop_at and resp.status == 1:  # FRAME_STATUS_OK
                    ok += 1
                    latencies.append((now - sent_at.pop(resp.sequence, now)) * 1e3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"ok_fps": ok / seconds, "p50_ms": float(np.percentile(latencies, 50)) if latencies else float("nan")}


def table(results: dict[str, dict[str, Any]]) -> str:
    cols = (("transport", 9), ("request B", 10), ("rtt p50 ms", 11), ("rtt p95 ms", 11), ("srv prep p50", 13),
            ("client CPU ms/f", 16), ("server CPU ms/f", 16), ("total CPU ms/f", 15), ("not OK", 7))
    lines = ["".join(name.rjust(w) for name, w in cols)]
    for t, r in results.items():
        vals = (t, r["request_bytes"], r["rtt_ms_p50"], r["rtt_ms_p95"], r["server_prep_ms_p50"],
                r["client_cpu_ms_per_frame"], r["server_cpu_ms_per_frame"], r["total_cpu_ms_per_frame"], r["not_ok"])
        lines.append("".join(str(v).rjust(w) for v, (_, w) in zip(vals, cols, strict=True)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", type=Path, help="manifest.json to serve (default: the shipped default model)")
    p.add_argument("--tiny", action="store_true", help="serve a tiny random-weight model: the transport's cost alone")
    p.add_argument("--frames", type=int, default=300, help="measured frames per transport (default 300)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds the frames are split into")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--json-out", type=Path, help="also write the results here as JSON")
    p.add_argument("--flat-out-s", type=float, default=10.0,
                   help="seconds per run of raw frames flat out, window 4 (0: skip; two rounds of two runs)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    frames = load_frames()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None and args.tiny:
            from tests.tiny_model import make_tiny_artifact

            model = make_tiny_artifact(Path(tmp) / "tiny")
        elif model is None:
            from bench.bench_server import shipped_model

            model = shipped_model(Path(tmp))
        from bench.bench_client import start_server

        proc, address = start_server(model, "--shm-allow", PREFIX)
        try:
            results = bench(address, proc.pid, frames, args.frames, max(1, args.rounds))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        flat: dict[str, list[dict[str, float]]] = {"4 MiB (default)": [], "64 MiB": []}
        for _ in range(2 if args.flat_out_s > 0 else 0):
            for name, inflight in (("4 MiB (default)", 4 << 20), ("64 MiB", 64 << 20)):
                flat[name].append(flat_out_raw(model, frames, args.flat_out_s, inflight))
    h, w = frames[0].shape[:2]
    ratios = {f"{t}_over_raw_{k}": round(results[t][k] / results["raw"][k], 2)
              for t in ("jpeg", "shm") for k in ("rtt_ms_p50", "total_cpu_ms_per_frame") if results["raw"][k]}
    doc = {"frame": f"{w}x{h} BGR8 from {VIDEO.relative_to(REPO)}", "lockstep": True, "transports": results,
           "ratios": ratios, "raw_flat_out_window4": flat}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{doc['frame']}, one frame in flight per transport, {results['raw']['frames']} frames each")
        print(table(results))
        print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
        if any(flat.values()):
            print(f"\nraw frames flat out, one stream, window 4, {args.flat_out_s:g} s a run, two rounds")
            print("| --max-stream-inflight-bytes | OK frames/s | p50 ms (sent -> answered) |")
            print("|---|---|---|")
            for name, runs in flat.items():
                print(f"| {name} | " + ", ".join(f"{r['ok_fps']:.1f}" for r in runs) + " | "
                      + ", ".join(f"{r['p50_ms']:.1f}" for r in runs) + " |")
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
