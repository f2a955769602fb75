"""Server benchmarks, measured side by side in one run (issue 5 targets).

1. StreamDetect p50 over loopback (lockstep, one camera) vs the same pipeline in-process
   (same frames, model, threads); target <= 1.05x.
2. Four cameras streaming as fast as they can, each on a connection of its own: answered fps
   vs the engine's best offline throughput at the same batch size, and vs the best in-process
   arrangement of the whole job; target >= 0.9x. Then the same from one server process per
   core (``--processes``): on a port each, the cameras spread round robin; and sharing one port
   (``--reuse-port``), the kernel spreading the connections. And the same cameras against
   bench/bare_grpc_server.py, a plain grpcio server whose handler threads each run one
   stream's frames through the pipeline, one after another, and do nothing else: how far a
   grpcio server in one process gets, so that what our server adds is the distance to it.
3. Reduced-scale decode + letterbox of a 1920x1080 JPEG vs full decode + letterbox; target >= 2x.
4. Server RSS with 8 camera streams at 30 fps, and its growth over --duration-s (issue: 10 min).

The server runs as a ``perception serve`` subprocess (as on the vehicle); clients run here.

    .venv/bin/python -m bench.bench_server [--model M.json | --checkpoint detector.pt]
        [--duration-s 600] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

if TYPE_CHECKING:
    from perception.v1.detector_pb2 import DetectRequest

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"ready grpc=(\S+):(\d+) metrics=(\S+):(\d+)")


def road_frame(w: int = 1920, h: int = 1080, seed: int = 0) -> np.ndarray:
    """A synthetic road scene (sky, road, boxes for vehicles), textured so JPEG has work to do."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2] = (200, 160, 120)
    img[h // 2 :] = (80, 80, 80)
    for _ in range(12):
        x, y = int(rng.integers(0, w - 200)), int(rng.integers(h // 3, h - 150))
        bw, bh = int(rng.integers(60, 300)), int(rng.integers(40, 200))
        cv2.rectangle(img, (x, y), (x + bw, y + bh), tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
    noise = rng.integers(0, 25, (h, w, 3), dtype=np.uint8)
    return cv2.add(img, noise)


def jpeg(img: np.ndarray, quality: int = 85) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


class ServerProcess:
    """``perception serve`` on loopback port 0. ``repo``: the checkout whose server runs (another
    one, e.g. a git worktree of an older commit, to measure a change against its past)."""

    def __init__(self, manifest: Path, threads: int, extra: list[str], repo: Path = REPO, port: int = 0) -> None:
        env = {**os.environ, "PYTHONPATH": str(repo)} if repo != REPO else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "perception.cli", "serve", "--model", str(manifest), "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", "0", *(["--threads", str(threads)] if threads else []), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=repo, env=env,
        )
        self.port = 0
        ready = threading.Event()
        self.log: list[str] = []

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line)
                m = READY.search(line)
                if m:
                    self.port = int(m.group(2))
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(120):
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log[-20:]))

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _req(cam: str, seq: int, data: bytes) -> DetectRequest:
    from perception.v1 import detector_pb2 as pb

    frame = pb.Frame(camera_id=cam, sequence=seq, capture_timestamp_ns=time.time_ns(), encoded=data)
    return pb.DetectRequest(frame=frame)


def lockstep_stream(stub: Any, frames: list[bytes], n: int) -> list[float]:
    """One camera, one frame in flight: round-trip latency per frame, ms."""
    q: queue.Queue = queue.Queue()
    lat: list[float] = []

    def gen() -> Iterator[DetectRequest]:
        for i in range(n):
            q.get()
            yield _req("front", i, frames[i % len(frames)])

    q.put(1)
    t0 = time.perf_counter()
    for _ in stub.StreamDetect(gen()):
        t1 = time.perf_counter()
        lat.append((t1 - t0) * 1e3)
        t0 = time.perf_counter()
        q.put(1)
    return lat


def served_threads() -> int:
    """The intra-op threads per batch the server chooses here when not told."""
    from server.runtime.settings import resolve_arrangement, usable_cores

    return resolve_arrangement(0, 0, usable_cores())[0]


def bench_latency(manifest: Path, frames: list[bytes], threads: int, n: int) -> dict[str, float]:
    import grpc

    from perception.manifest import load_manifest
    from perception.pipeline import FrameInput, FramePipeline, RequestOptions
    from perception.v1 import detector_pb2_grpc as pb_grpc
    from server.runtime.factory import RuntimeSettings, backend_for

    m = load_manifest(manifest)
    pipe = FramePipeline.from_manifest(m)
    backend, _ = backend_for(m, "", RuntimeSettings(threads=threads or served_threads(), max_batch=1))
    pipe.bind_outputs(backend.outputs)
    server = ServerProcess(manifest, threads, ["--max-batch", "1"])
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.DetectorStub(channel)
    inproc: list[float] = []
    loop: list[float] = []
    try:
        lockstep_stream(stub, frames, 20)  # warm up
        for _round in range(3):  # interleave, so drift in machine load hits both alike
            for i in range(n):
                t0 = time.perf_counter()
                batch = [FrameInput("front", i, 0, encoded=frames[i % len(frames)])]
                pipe.run_batch(batch, RequestOptions(), backend.infer)
                inproc.append((time.perf_counter() - t0) * 1e3)
            loop += lockstep_stream(stub, frames, n)
    finally:
        channel.close()
        server.stop()
        backend.deactivate()
    p_in, p_loop = statistics.median(inproc), statistics.median(loop)
    return {"inprocess_p50_ms": p_in, "loopback_p50_ms": p_loop, "ratio": p_loop / p_in,
            "inprocess_p95_ms": pct(inproc, 95), "loopback_p95_ms": pct(loop, 95), "frames": len(loop)}


def bench_throughput(manifest: Path, frames: list[bytes], threads: int, batch: int, seconds: float,
                     cameras: int = 4, window: int = 3, server_args: list[str] | None = None,
                     processes: int = 0) -> dict[str, Any]:
    from perception.manifest import load_manifest
    from perception.pipeline import FrameInput, FramePipeline, RequestOptions
    from perception.v1 import detector_pb2 as pb
    from server.runtime.factory import RuntimeSettings, backend_for

    m = load_manifest(manifest)
    # One worker spreading each batch over every core (or the threads given), as before this
    # server ran one batch per core.
    backend, _ = backend_for(m, "", RuntimeSettings(threads=threads or (os.cpu_count() or 1), max_batch=batch))
    pipe = FramePipeline.from_manifest(m)
    pipe.bind_outputs(backend.outputs)
    x = np.repeat(pipe.model_inputs([FrameInput("front", 0, 0, encoded=frames[0])]), batch, axis=0)
    for _ in range(3):
        backend.infer(x)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        backend.infer(x)
        iters += 1
    offline_fps = iters * batch / (time.perf_counter() - t0)
    # The whole job in-process, batch by batch: decode, letterbox, inference, NMS, boxes back.
    req, iters, t0 = RequestOptions(), 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch_frames = [FrameInput(f"cam{k}", iters, 0, encoded=frames[(iters + k) % len(frames)])
                        for k in range(batch)]
        pipe.run_batch(batch_frames, req, backend.infer)
        iters += 1
    pipeline_fps = iters * batch / (time.perf_counter() - t0)
    backend.deactivate()
    # The same job with one worker per core, each a one-thread session taking its own batches of
    # `batch` frames or of one (bench/bench_workers.py): the best in-process arrangement here.
    import psutil

    from bench.bench_workers import run as run_workers

    me = psutil.Process()
    cores = os.cpu_count() or 1
    workers_fps, workers_cpu_ms = pipeline_fps, float("nan")
    for b in sorted({1, batch}) if cores > 1 else ():
        cpu0 = sum(me.cpu_times()[:2])
        fps = run_workers(m, frames, cores, 1, b, seconds)
        if fps > workers_fps:  # CPU per frame of the best arrangement (setup and warm-up counted too)
            workers_fps, workers_cpu_ms = fps, 1e3 * (sum(me.cpu_times()[:2]) - cpu0) / (fps * seconds)

    flags = ["--max-batch", str(batch), *(server_args or [])]
    counts, cpus, client_cpu = _flat_out([ServerProcess(manifest, threads, flags)], frames, cameras, window, seconds)
    server_cpu = cpus[0]
    ok_fps = counts.get(pb.FRAME_STATUS_OK, 0) / seconds
    multi: dict[str, Any] = {}
    if processes > 1:
        # The same job on `processes` servers, one inference worker and one decode thread each:
        # a GIL per process instead of one for every thread. First on a port each, the cameras
        # spread round robin (as the client library spreads its sessions over several targets);
        # then sharing one port (--reuse-port), where the kernel hands out the connections.
        from bench.bench_triton import free_port

        one_core = ["--inference-workers", "1", "--decode-threads", "1"]
        multi["processes"] = processes
        for name, reuse in (("multi", False), ("reuse", True)):
            port = free_port() if reuse else 0
            servers = [ServerProcess(manifest, threads, [*flags, *one_core, *(["--reuse-port"] if reuse else [])],
                                     port=port) for _ in range(processes)]
            m_counts, m_cpus, _ = _flat_out(servers, frames, cameras, window, seconds)
            m_fps, m_cpu = m_counts.get(pb.FRAME_STATUS_OK, 0) / seconds, sum(m_cpus)
            multi |= {f"{name}_fps": m_fps, f"{name}_ratio": m_fps / max(pipeline_fps, workers_fps),
                      f"{name}_cores": m_cpu / seconds,
                      f"{name}_cpu_ms_per_ok": 1e3 * m_cpu / max(1.0, m_fps * seconds),
                      f"{name}_cores_each": [round(c / seconds, 2) for c in m_cpus]}
    best = max(pipeline_fps, workers_fps)
    # The floor: a plain grpcio server running the pipeline on each stream's handler thread
    # (one onnxruntime session shared by every stream's runs, at once), with our thread count.
    from bench.bench_triton import BareServer

    bare: dict[str, Any]
    try:
        b_counts, b_cpus, _ = _flat_out([BareServer(manifest, threads or served_threads(), streams=cameras)],
                                        frames, cameras, window, seconds)
        bare_fps = b_counts.get(pb.FRAME_STATUS_OK, 0) / seconds
        bare = {"bare_fps": bare_fps, "bare_ratio": bare_fps / best,
                "ours_vs_bare": ok_fps / bare_fps if bare_fps else float("nan"), "bare_cores": b_cpus[0] / seconds,
                "bare_cpu_ms_per_ok": 1e3 * b_cpus[0] / max(1.0, bare_fps * seconds)}
    except RuntimeError as exc:  # it did not start: the rest of the results stand
        bare = {"bare_skipped": str(exc)}
    return {**bare,
            "offline_fps": offline_fps, "pipeline_fps": pipeline_fps, "served_fps": ok_fps,
            "ratio": ok_fps / offline_fps, "pipeline_ratio": ok_fps / pipeline_fps, "batch": batch,
            "pipeline_workers_fps": workers_fps, "best_pipeline_ratio": ok_fps / best, "cores": cores,
            "stale": counts.get(pb.FRAME_STATUS_DROPPED_STALE, 0),
            "overloaded": counts.get(pb.FRAME_STATUS_OVERLOADED, 0),
            "server_cores": server_cpu / seconds, "client_cores": client_cpu / seconds,
            "server_cpu_ms_per_ok": 1e3 * server_cpu / max(1.0, ok_fps * seconds),
            "pipeline_workers_cpu_ms": workers_cpu_ms, **multi}


class Served(Protocol):
    """A server process the flat-out cameras drive: ours (ServerProcess) or the bare one."""

    port: int
    proc: subprocess.Popen[str]

    def stop(self) -> object: ...


def _flat_out(servers: Sequence[Served], frames: list[bytes], cameras: int, window: int,
              seconds: float) -> tuple[dict[int, int], list[float], float]:
    """``cameras`` streams, each on a connection of its own and keeping ``window`` frames in
    flight, against ``servers`` (one, or several sharing a port); stops them. (answers by status,
    each server's CPU seconds, this process's CPU seconds) over ``seconds`` after a 2 s ramp-up."""
    import grpc
    import psutil

    from perception.v1 import detector_pb2_grpc as pb_grpc

    me = psutil.Process()
    counts: dict[int, int] = {}
    lock = threading.Lock()
    stop_at = time.perf_counter() + 2.0 + seconds

    def camera(cam: int) -> None:
        # Its own connection (no subchannel shared between channels), as separate camera nodes,
        # to the servers in turn (on a shared port the kernel picks one per connection).
        address = f"127.0.0.1:{servers[cam % len(servers)].port}"
        ch = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        stub = pb_grpc.DetectorStub(ch)
        credits = threading.Semaphore(window)

        def gen() -> Iterator[DetectRequest]:
            i = 0
            while time.perf_counter() < stop_at:
                credits.acquire()
                yield _req(f"cam{cam}", i, frames[(i + cam) % len(frames)])
                i += 1

        for resp in stub.StreamDetect(gen()):
            credits.release()
            if time.perf_counter() > stop_at - seconds:  # skip the first 2 s (ramp-up)
                with lock:
                    counts[resp.status] = counts.get(resp.status, 0) + 1
        ch.close()

    cpu: dict[str, float] = {}
    try:  # the servers are stopped however the run ends
        served = [psutil.Process(s.proc.pid) for s in servers]

        def sample(key: str, at: float) -> None:  # both sides' CPU seconds when counting starts / ends
            time.sleep(max(0.0, at - time.perf_counter()))
            for i, p in enumerate(served):
                cpu[f"{key}_server{i}"] = sum(p.cpu_times()[:2])
            cpu[key + "_clients"] = sum(me.cpu_times()[:2])

        ts = [threading.Thread(target=camera, args=(c,)) for c in range(cameras)]
        ts += [threading.Thread(target=sample, args=(k, at))
               for k, at in (("t0", stop_at - seconds), ("t1", stop_at))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        for server in servers:
            server.stop()
    each = [cpu[f"t1_server{i}"] - cpu[f"t0_server{i}"] for i in range(len(servers))]
    return counts, each, cpu["t1_clients"] - cpu["t0_clients"]


def drive_frame(path: Path = REPO / "assets/drives/demo/front.mp4") -> np.ndarray | None:
    """The bundled drive's first front frame, upscaled to 1920x1080 (None if it is absent)."""
    cap = cv2.VideoCapture(str(path))
    ok, img = cap.read()
    cap.release()
    return cv2.resize(img, (1920, 1080), interpolation=cv2.INTER_CUBIC) if ok else None


def bench_decode(n: int, size: tuple[int, int] = (640, 384), image: np.ndarray | None = None) -> dict[str, Any]:
    """Decode + letterbox (uint8, what the target names) and the whole pre-processing (+ float)."""
    from perception.decode import decode_encoded
    from perception.letterbox import letterbox_image
    from perception.manifest import PreprocessSpec
    from perception.preprocess import preprocess

    spec = PreprocessSpec(size[0], size[1])
    data = jpeg(road_frame() if image is None else image)
    times: dict[str, list[float]] = {"full": [], "reduced": [], "full_pre": [], "reduced_pre": []}
    # Blocks of one kind at a time, alternating: per-frame alternation thrashes the caches
    # (measured: each path ~1.5x slower when alternated frame by frame).
    for _round in range(4):
        for name, need in (("full", None), ("reduced", size)):
            for _ in range(n // 4):
                t0 = time.perf_counter()
                img, _, _ = decode_encoded(data, need)
                letterbox_image(img, size[0], size[1])
                times[name].append((time.perf_counter() - t0) * 1e3)
            for _ in range(n // 4):
                t0 = time.perf_counter()
                img, _, _ = decode_encoded(data, need)
                preprocess(img, spec)
                times[name + "_pre"].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}  # the least disturbed run, on a shared machine
    return {"full_ms": med["full"], "reduced_ms": med["reduced"], "speedup": med["full"] / med["reduced"],
            "full_min_ms": best["full"], "reduced_min_ms": best["reduced"],
            "speedup_min": best["full"] / best["reduced"],
            "full_preprocess_ms": med["full_pre"], "reduced_preprocess_ms": med["reduced_pre"],
            "preprocess_speedup": med["full_pre"] / med["reduced_pre"], "input": f"{size[0]}x{size[1]}",
            "jpeg_bytes": len(data)}


def bench_memory(manifest: Path, frames: list[bytes], threads: int, seconds: float, cameras: int = 8,
                 fps: float = 30.0, server_args: list[str] | None = None) -> dict[str, Any]:
    import grpc

    from perception.v1 import detector_pb2_grpc as pb_grpc

    server = ServerProcess(manifest, threads, server_args or [])
    idle_mb = server.rss_mb()
    stop_at = time.perf_counter() + seconds
    answered = [0] * cameras

    def camera(cam: int) -> None:
        ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = pb_grpc.DetectorStub(ch)

        def gen() -> Iterator[DetectRequest]:
            i, t_next = 0, time.perf_counter()
            while time.perf_counter() < stop_at:
                t_next += 1.0 / fps
                time.sleep(max(0.0, t_next - time.perf_counter()))
                yield _req(f"cam{cam}", i, frames[(i + cam) % len(frames)])
                i += 1

        for _ in stub.StreamDetect(gen()):
            answered[cam] += 1
        ch.close()

    ts = [threading.Thread(target=camera, args=(c,), daemon=True) for c in range(cameras)]
    for t in ts:
        t.start()
    samples: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    while any(t.is_alive() for t in ts):
        samples.append((time.perf_counter() - t0, server.rss_mb()))
        time.sleep(1.0)
    for t in ts:
        t.join()
    server.stop()
    rss = [s[1] for s in samples]
    t_warm = min(10.0, seconds * 0.2)
    warm = [(t, r) for t, r in samples if t >= t_warm] or samples
    ts_, rs_ = np.array([t for t, _ in warm]), np.array([r for _, r in warm])
    # Growth as a trend (least-squares slope), not end minus start: RSS moves with each batch.
    slope = float(np.polyfit(ts_, rs_, 1)[0] * 60.0) if len(warm) > 2 else float("nan")
    return {"cameras": cameras, "duration_s": seconds, "idle_mb": idle_mb, "max_mb": max(rss),
            "p50_mb": float(np.median(rs_)), "p95_mb": float(np.percentile(rs_, 95)),
            "after_warmup_mb": float(rs_[0]), "end_mb": rss[-1], "growth_mb": rss[-1] - float(rs_[0]),
            "trend_mb_per_min": slope, "answered_fps": sum(answered) / seconds,
            "samples": [(round(t, 1), round(r, 1)) for t, r in samples]}


def resolve_model(args: argparse.Namespace, tmp: Path) -> Path:
    if args.model:
        return Path(args.model)
    if args.checkpoint or args.random_preset:
        from build_engine.build import export_fp32_artifact

        ckpt = Path(args.checkpoint) if args.checkpoint else tmp / "random.pt"
        if args.random_preset:
            # The default architecture with random weights: the real inference cost, before
            # a trained checkpoint exists (its detections are meaningless).
            import torch

            from build_engine.checkpoint import meta_for, save_checkpoint
            from build_engine.model.config import preset
            from build_engine.model.detector import build_detector

            torch.manual_seed(0)
            model = build_detector(preset(args.random_preset)).eval()
            save_checkpoint(ckpt, model, meta_for(model))
        return export_fp32_artifact(ckpt, tmp / "fp32")
    if args.tiny:
        sys.path.insert(0, str(REPO))
        from tests.tiny_model import make_tiny_artifact

        return make_tiny_artifact(tmp / "tiny", width=640, height=384)
    return shipped_model(tmp)


def shipped_model(tmp: Path) -> Path:
    """The model users get: the demo's build of the shipped default (artifacts/demo/engine), or
    the same build made now if `make demo` has not run."""
    demo = REPO / "artifacts" / "demo" / "engine" / "manifest.json"
    if demo.is_file():
        return demo
    out = tmp / "default"
    subprocess.run([sys.executable, "-m", "perception.cli", "build", "--out", str(out), "--pruned",
                    str(REPO / "models" / "default" / "detector_pruned.pt"), "--no-report", "--no-scaling",
                    "--continue-on-fail"], check=True, cwd=REPO)
    return out / "manifest.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="manifest.json to serve (default: the shipped default model, as `make demo` "
                   "builds it)")
    p.add_argument("--tiny", action="store_true", help="serve a tiny random model instead (plumbing only)")
    p.add_argument("--checkpoint", help="a detector.pt to export to an fp32 artifact first")
    p.add_argument("--random-preset", help="export a randomly initialised model of this preset (e.g. small)")
    p.add_argument("--threads", type=int, default=0, help="inference threads, same in-process and served (default: "
                   "the server's own choice, one per batch on a CPU)")
    p.add_argument("--batch", type=int, default=4, help="batch size for the throughput comparison")
    p.add_argument("--frames", type=int, default=200, help="frames per latency round")
    p.add_argument("--throughput-s", type=float, default=15.0)
    p.add_argument("--processes", type=int, default=-1,
                   help="also serve the 4 cameras from this many server processes (a port each, then one shared "
                        "port); default: one per core when there are several; 0 or 1: not")
    p.add_argument("--duration-s", type=float, default=600.0, help="memory run length (issue: 10 minutes)")
    p.add_argument("--server-args", help="extra `perception serve` flags for the throughput and memory runs, "
                                         "e.g. '--inference-workers 2'")
    p.add_argument("--only", nargs="*", choices=("latency", "throughput", "decode", "memory"))
    p.add_argument("--json-out", help="write the results here as JSON")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    frames = [jpeg(road_frame(seed=s)) for s in range(8)]
    results: dict[str, Any] = {}
    which = set(args.only or ("latency", "throughput", "decode", "memory"))
    with tempfile.TemporaryDirectory() as tmp:
        manifest = resolve_model(args, Path(tmp))
        results["model"] = str(manifest)
        if "decode" in which:
            sources: dict[str, np.ndarray | None] = {"synthetic (noisy, high-entropy)": None}
            real = drive_frame()
            if real is not None:
                sources = {"bundled drive frame": real, **sources}
            results["decode"] = {}
            for label, image in sources.items():
                results["decode"][label] = r = bench_decode(60, image=image)
                print(f"decode+letterbox 1920x1080 JPEG ({label}, {r['jpeg_bytes'] // 1024} KB) -> {r['input']}: "
                      f"full {r['full_ms']:.2f} ms, reduced {r['reduced_ms']:.2f} ms = {r['speedup']:.2f}x "
                      f"(min {r['full_min_ms']:.2f} vs {r['reduced_min_ms']:.2f} ms = {r['speedup_min']:.2f}x; "
                      f"target >= 2x); with float conversion {r['full_preprocess_ms']:.2f} vs "
                      f"{r['reduced_preprocess_ms']:.2f} ms = {r['preprocess_speedup']:.2f}x", flush=True)
        if "latency" in which:
            results["latency"] = r = bench_latency(manifest, frames, args.threads, args.frames)
            print(f"StreamDetect p50 loopback {r['loopback_p50_ms']:.2f} ms "
                  f"vs in-process {r['inprocess_p50_ms']:.2f} ms = {r['ratio']:.3f}x (target <= 1.05x)", flush=True)
        if "throughput" in which:
            extra = args.server_args.split() if args.server_args else None
            procs = (os.cpu_count() or 1) if args.processes < 0 else args.processes
            results["throughput"] = r = bench_throughput(manifest, frames, args.threads, args.batch, args.throughput_s,
                                                         server_args=extra, processes=procs)
            print(f"4 cameras flat out: served {r['served_fps']:.1f} OK fps vs the in-process pipeline (decode, "
                  f"letterbox, inference, NMS) {r['pipeline_fps']:.1f} fps at batch {r['batch']} = "
                  f"{r['pipeline_ratio']:.3f}x; vs the best in-process arrangement here (that, or the same job "
                  f"on {r['cores']} one-thread workers, 1 or {r['batch']} frames per run) "
                  f"{r['pipeline_workers_fps']:.1f} fps: "
                  f"{r['best_pipeline_ratio']:.3f}x (target >= 0.9x of the best); vs the engine alone "
                  f"{r['offline_fps']:.1f} fps = {r['ratio']:.3f}x; stale {r['stale']}", flush=True)
            print(f"  CPU: the server used {r['server_cores']:.2f} cores, {r['server_cpu_ms_per_ok']:.2f} ms per OK "
                  "frame "
                  f"(the best in-process arrangement: {r['pipeline_workers_cpu_ms']:.2f} ms per frame); the 4 "
                  f"cameras' client threads {r['client_cores']:.2f} cores", flush=True)
            if "bare_fps" in r:
                print(f"  the bare grpcio server (bench/bare_grpc_server.py: each stream's frames run start to end "
                      f"on its handler thread, nothing else): {r['bare_fps']:.1f} OK fps = {r['bare_ratio']:.3f}x the "
                      f"best in-process arrangement, {r['bare_cores']:.2f} cores, {r['bare_cpu_ms_per_ok']:.2f} ms "
                      f"per OK frame; ours is {r['ours_vs_bare']:.3f}x it", flush=True)
            else:
                print(f"  the bare grpcio server: skipped ({r['bare_skipped']})", flush=True)
            for name, how in (("multi", "a port each, the cameras spread round robin"),
                              ("reuse", "sharing one port with --reuse-port, the kernel spreading the connections")):
                if f"{name}_fps" in r:
                    print(f"  {r['processes']} server processes ({how}; one inference worker and one decode thread "
                          f"each): {r[name + '_fps']:.1f} OK fps = {r[name + '_ratio']:.3f}x the best in-process "
                          f"arrangement; {r[name + '_cores']:.2f} cores "
                          f"({' + '.join(str(c) for c in r[name + '_cores_each'])}), "
                          f"{r[name + '_cpu_ms_per_ok']:.2f} ms per OK frame", flush=True)
        if "memory" in which:
            results["memory"] = r = bench_memory(manifest, frames, args.threads, args.duration_s,
                                                 server_args=args.server_args.split() if args.server_args else None)
            print(f"8 cameras x 30 fps for {r['duration_s']:.0f} s: RSS idle {r['idle_mb']:.0f} MB, after warm-up "
                  f"{r['after_warmup_mb']:.0f} MB, p50 {r['p50_mb']:.0f} MB, p95 {r['p95_mb']:.0f} MB, max "
                  f"{r['max_mb']:.0f} MB, end {r['end_mb']:.0f} MB, trend {r['trend_mb_per_min']:+.2f} MB/min "
                  f"(target < 400 MB, flat); answered {r['answered_fps']:.1f} fps", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
