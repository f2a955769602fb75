"""Side by side with NVIDIA Triton: the same frame pipeline in-process, behind our server, and
behind Triton, one 1280x720 JPEG per call, one frame in flight.

Paths, alternated within each round (``--rounds``, default 3; this machine is noisy, so a
path's figure is the median of its per-round p50s):

- ``in-process``: decode, letterbox, onnxruntime, NMS called directly (FramePipeline and the
  server's own onnxruntime backend, ``--threads`` intra-op threads);
- ``Detect``: our unary RPC over loopback;
- ``StreamDetect``: our stream, lockstep (the next frame sent when the answer arrived);
- ``bare grpcio Detect`` and ``bare grpcio StreamDetect``: the same two calls, driven by the
  same client code, to a plain grpcio server whose handlers call the same pipeline and nothing
  else (bench/bare_grpc_server.py): the floor of any grpcio server doing this job, so that our
  server's own overhead is the distance to it;
- ``bare grpc.aio Detect`` and ``bare grpc.aio StreamDetect``: the same bare server on
  grpc.aio (``--aio``), its handlers running the pipeline on the event loop's thread: whether
  an asyncio server would lower that floor;
- ``KServe v2 (ours)``: our ``--kserve`` front door, driven by stock ``tritonclient``;
- ``Triton``: Triton 2.51 through PyTriton 0.7 serving the same pipeline code (its Python
  backend calling FramePipeline and our onnxruntime backend with the same settings), driven by
  the same ``tritonclient`` code (bench/triton_peer.py, bench/triton_driver.py);
- ``KServe v2 stream (ours)`` and ``Triton stream``: the same two servers on one
  ModelStreamInfer stream (Triton's streaming extension), lockstep.

Triton and tritonclient run in a peer venv this script makes (``--peer-venv``, default
~/.cache/perception/triton-peer): PyTriton needs Python 3.12 (its Python backend stub loads
that interpreter's libpython3.12, so the peer runs with its lib directory on
LD_LIBRARY_PATH) and numpy < 2; tritonclient pins protobuf < 7. Without a Python 3.12 the
Triton row is skipped with the reason, and tritonclient gets a venv of this interpreter.

The served model is the shipped default (artifacts/demo/engine, built by `make demo`) unless
``--model`` says otherwise. Detections are checked equal across paths (count per frame).

    .venv/bin/python -m bench.bench_triton [--model M.json] [--rounds 3] [--n 200] [--threads T] [--json-out F]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "artifacts" / "demo" / "engine" / "manifest.json"
DRIVE = REPO / "assets" / "drives" / "demo" / "front.mp4"
DEFAULT_PEER = Path.home() / ".cache" / "perception" / "triton-peer"
READY_MARK = "ready grpc="  # what bench/triton_peer.py and bench/bare_grpc_server.py print once they serve
START_TIMEOUT_S = 300.0  # Triton loading the model (the peer venv is made before)
# The peer's pins: PyTriton 0.7 (Triton 2.51) wants numpy < 2, so numpy and OpenCV are the
# newest it accepts; onnxruntime and simplejpeg are the project's own versions.
PEER_PACKAGES = ("nvidia-pytriton==0.7.0", "tritonclient[grpc]==2.73.0", "numpy==1.26.4",
                 "opencv-python-headless==4.11.0.86", "pyyaml")
CLIENT_PACKAGES = ("tritonclient[grpc]==2.73.0", "numpy")
PATHS = ("in-process", "Detect", "StreamDetect", "bare grpcio Detect", "bare grpcio StreamDetect",
         "bare grpc.aio Detect", "bare grpc.aio StreamDetect",
         "KServe v2 (ours)", "Triton", "KServe v2 stream (ours)", "Triton stream")
# The floor of a grpcio server doing this job (bench/bare_grpc_server.py), driven by the same
# client code as ours: what our server adds is the distance to it. (the method, on grpc.aio)
BARE_PATHS = {"bare grpcio Detect": ("Detect", False), "bare grpcio StreamDetect": ("StreamDetect", False),
              "bare grpc.aio Detect": ("Detect", True), "bare grpc.aio StreamDetect": ("StreamDetect", True)}
# The KServe paths: (ours or Triton's, on a ModelStreamInfer stream or not).
KSERVE_PATHS = {"KServe v2 (ours)": (True, False), "Triton": (False, False),
                "KServe v2 stream (ours)": (True, True), "Triton stream": (False, True)}


def _installed(name: str) -> str:
    from importlib.metadata import version

    return f"{name}=={version(name)}"


def find_python312() -> str | None:
    """A Python 3.12 interpreter: on PATH, else one of pyenv's."""
    pyenv = sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.12*/bin/python3.12")))
    for cand in [shutil.which("python3.12"), *pyenv]:
        if cand and subprocess.run([cand, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                   capture_output=True).returncode == 0:
            return cand
    return None


def make_peer(venv: Path) -> tuple[Path, bool, str]:
    """(the peer venv's python, whether it runs Triton, why not). Made once, remade when the
    pinned packages change."""
    py312 = find_python312()
    if py312 is None:
        return make_client_only(venv, "no Python 3.12 interpreter here (PyTriton's Python backend needs one)")
    python = venv / "bin" / "python"
    stamp = venv / ".packages"
    want = [*PEER_PACKAGES, _installed("onnxruntime"), _installed("simplejpeg")]
    if python.exists() and stamp.exists() and stamp.read_text() == " ".join(want):
        return python, True, ""
    print(f"[bench_triton] making {venv} ({py312}): {' '.join(want)}", file=sys.stderr, flush=True)
    subprocess.run([py312, "-m", "venv", "--clear", str(venv)], check=True)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", *want], capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        return make_client_only(venv, f"nvidia-pytriton did not install: {done.stderr.strip()[-300:]}")
    stamp.write_text(" ".join(want))
    return python, True, ""


def make_client_only(venv: Path, why: str) -> tuple[Path, bool, str]:
    """A venv of this interpreter with tritonclient only: our KServe row without Triton's."""
    client = venv.with_name(venv.name + "-client")
    python = client / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(client)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *CLIENT_PACKAGES], check=True)
    return python, False, why


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_frames(out: Path, n: int = 30) -> list[bytes]:
    """The bundled drive's first ``n`` front frames as 1280x720 JPEGs (quality 90)."""
    out.mkdir(parents=True, exist_ok=True)
    cap = cv2.VideoCapture(str(DRIVE))
    frames: list[bytes] = []
    while len(frames) < n:
        ok, img = cap.read()
        if not ok:
            break
        data = cv2.imencode(".jpg", cv2.resize(img, (1280, 720)), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        (out / f"{len(frames):03d}.jpg").write_bytes(data)
        frames.append(data)
    cap.release()
    if not frames:
        raise SystemExit(f"no frames read from {DRIVE}")
    return frames


def wait_for_mark(proc: subprocess.Popen[str], timeout_s: float,
                  sink: Callable[[str], object] | None = None) -> str | None:
    """The first line of ``proc``'s stdout holding READY_MARK, or None if the process exits or
    ``timeout_s`` passes first. Its stdout is read on a thread until it exits (a full pipe would
    stall it), and the mark is looked for anywhere in a line: tritonserver logs on the peer's
    stdout through a thread of PyTriton's that can leave a line unfinished when the peer prints
    its mark (it was missed once at the start of a line, and the bench waited for ever). Every
    line read is also given to ``sink`` (the peer's log: tritonserver's own errors are there)."""
    stdout = proc.stdout
    assert stdout is not None  # stdout=PIPE
    found: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for line in stdout:
            if sink is not None:
                sink(line)
            if not found and READY_MARK in line:
                found.append(line[line.index(READY_MARK) + len(READY_MARK):].strip())
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.5):
        if proc.poll() is not None:
            ready.wait(1.0)  # a mark printed just before it exited is still read
            break
        if time.monotonic() > deadline:
            break
    return found[0] if found else None


def stop_process(proc: subprocess.Popen[str], group: bool = False) -> None:
    """SIGTERM (to its process group with ``group``), then SIGKILL if it has not ended in 30 s."""
    import signal

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    if proc.poll() is None:
        send(signal.SIGTERM if not group else signal.SIGINT)  # PyTriton stops its tritonserver on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait(10)
    if group:  # whatever of its group outlived it (a tritonserver whose PyTriton parent died)
        send(signal.SIGKILL)


def await_start(proc: subprocess.Popen[str], stop: Callable[[], None], what: str,
                sink: Callable[[str], object] | None = None) -> str:
    """What follows READY_MARK on ``proc``'s stdout once it serves (``wait_for_mark``). If it
    exits, times out or the wait is interrupted (Ctrl-C while it loads), ``stop`` runs first;
    then RuntimeError names ``what`` and why."""
    try:
        mark = wait_for_mark(proc, START_TIMEOUT_S, sink)
    except BaseException:
        stop()
        raise
    if mark is None:
        why = (f"exited ({proc.returncode})" if proc.poll() is not None
               else f"did not start within {START_TIMEOUT_S:g} s")
        stop()
        raise RuntimeError(f"{what}: {why}")
    return mark


class BareServer:
    """bench/bare_grpc_server.py, the same pipeline behind a plain grpcio server, in its own process."""

    def __init__(self, manifest: Path, threads: int, aio: bool = False, streams: int = 4) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bare_grpc_server", "--model", str(manifest), "--threads", str(threads),
             "--streams", str(streams), *(["--aio"] if aio else [])],
            cwd=REPO, stdout=subprocess.PIPE, text=True)
        self.address = await_start(self.proc, self.stop, "bench/bare_grpc_server.py (its error is above)")
        try:
            self.port = int(self.address.rsplit(":", 1)[1])
        except ValueError:
            self.stop()
            raise RuntimeError(f"bench/bare_grpc_server.py said it serves on {self.address!r}") from None

    def stop(self) -> None:
        stop_process(self.proc)


class TritonPeer:
    """bench/triton_peer.py in the peer venv, on free loopback ports."""

    def __init__(self, python: Path, manifest: Path, threads: int, instances: int = 1) -> None:
        self.port = free_port()
        libdir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                                capture_output=True, text=True, check=True).stdout.strip()
        env = dict(os.environ, PYTHONPATH=str(REPO),
                   LD_LIBRARY_PATH=os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p))
        self.log = tempfile.NamedTemporaryFile(prefix="triton_peer_", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(python), str(REPO / "bench" / "triton_peer.py"), "--manifest", str(manifest), "--grpc-port",
             str(self.port), "--http-port", str(free_port()), "--metrics-port", str(free_port()),
             "--threads", str(threads), "--instances", str(instances)],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, start_new_session=True)

        def to_log(line: str) -> None:
            self.log.write(line.encode())
            self.log.flush()

        # Its own session: a Ctrl-C at the terminal does not reach it, so it is stopped here.
        await_start(self.proc, self.stop, f"Triton (see {self.log.name})", sink=to_log)
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc, group=True)  # tritonserver is PyTriton's child: the whole group


def drive_kserve(python: Path, address: str, model: str, frames_dir: Path, n: int, warmup: int,
                 stream: bool = False) -> dict[str, Any]:
    done = subprocess.run([str(python), str(REPO / "bench" / "triton_driver.py"), "--url", address, "--model", model,
                           "--frames", str(frames_dir), "--n", str(n), "--warmup", str(warmup),
                           *(["--stream"] if stream else [])],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"tritonclient driver failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_triton", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="manifest.json (default: the shipped demo model)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--n", type=int, default=200, help="timed calls per path per round (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls per path per round (default 20)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads everywhere (default: what "
                   "the server chooses here when not told, one on a CPU)")
    p.add_argument("--peer-venv", type=Path, default=DEFAULT_PEER, help="where the Triton peer venv is made")
    p.add_argument("--json-out", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)
    if not args.model.is_file():
        raise SystemExit(f"{args.model}: no such manifest (run `make demo` to build the shipped model)")

    import grpc

    from bench.bench_client import start_server
    from bench.bench_server import lockstep_stream
    from perception.manifest import load_manifest
    from perception.pipeline import FrameInput, FramePipeline, RequestOptions
    from perception.v1 import detector_pb2 as pb
    from perception.v1 import detector_pb2_grpc as pb_grpc
    from server.runtime.factory import RuntimeSettings, backend_for

    if not args.threads:
        from bench.bench_server import served_threads

        args.threads = served_threads()
    python, can_triton, why_not = make_peer(args.peer_venv)
    manifest = load_manifest(args.model)
    # Everything started is stopped, in reverse, however the run ends (an error, Ctrl-C).
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="bench_triton_"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        frames = bench_frames(tmp / "frames")

        pipe = FramePipeline.from_manifest(manifest)
        backend, _ = backend_for(manifest, "", RuntimeSettings(threads=args.threads, max_batch=1))
        stack.callback(backend.deactivate)
        pipe.bind_outputs(backend.outputs)
        proc, address = start_server(args.model, "--kserve", "--threads", str(args.threads))
        stack.callback(stop_process, proc)
        peer = None
        if can_triton:
            try:
                peer = TritonPeer(python, args.model, args.threads)
                stack.callback(peer.stop)
            except RuntimeError as exc:
                why_not = str(exc)
        bare_stubs = {}
        for aio in (False, True):
            try:
                bare = BareServer(args.model, args.threads, aio=aio)
            except RuntimeError as exc:
                if not aio:
                    raise
                print(f"[bench_triton] the grpc.aio bare server did not start, its rows are skipped: {exc}",
                      file=sys.stderr, flush=True)
                continue
            stack.callback(bare.stop)
            bare_channel = grpc.insecure_channel(bare.address)
            stack.callback(bare_channel.close)
            bare_stubs[aio] = pb_grpc.DetectorStub(bare_channel)
        channel = grpc.insecure_channel(address)
        stack.callback(channel.close)
        stub = pb_grpc.DetectorStub(channel)

        def inprocess(n: int) -> tuple[list[float], list[int]]:
            lat, dets = [], []
            for i in range(n):
                t0 = time.perf_counter()
                (d,) = pipe.run_batch([FrameInput("front", i, 0, encoded=frames[i % len(frames)])], RequestOptions(),
                                      backend.infer)
                lat.append((time.perf_counter() - t0) * 1e3)
                dets.append(len(d))
            return lat, dets

        stages: dict[str, list[float]] = {k: [] for k in ("queue", "preprocess", "inference", "postprocess", "total")}

        def detect(n: int, on: Any = stub) -> tuple[list[float], list[int]]:
            lat, dets = [], []
            for i in range(n):
                req = pb.DetectRequest(frame=pb.Frame(camera_id="front", sequence=i, encoded=frames[i % len(frames)]))
                t0 = time.perf_counter()
                resp = on.Detect(req, timeout=30)
                lat.append((time.perf_counter() - t0) * 1e3)
                dets.append(len(resp.detections))
                if on is not stub:
                    continue
                t = resp.timings
                for k, us in (("queue", t.queue_us), ("preprocess", t.preprocess_us), ("inference", t.inference_us),
                              ("postprocess", t.postprocess_us), ("total", t.total_us)):
                    stages[k].append(us / 1e3)
            return lat, dets

        def stream(n: int, on: Any = stub) -> tuple[list[float], list[int]]:
            return lockstep_stream(on, frames, n), []

        runs: dict[str, list[list[float]]] = {k: [] for k in PATHS}
        counts: dict[str, list[int]] = {}
        for rnd in range(args.rounds):
            print(f"[bench_triton] round {rnd + 1}/{args.rounds}", file=sys.stderr, flush=True)
            for name in PATHS:
                if name in KSERVE_PATHS:
                    ours, on_stream = KSERVE_PATHS[name]
                    if not ours and peer is None:
                        continue
                    target = address if ours else peer.address  # type: ignore[union-attr]
                    r = drive_kserve(python, target, manifest.name, tmp / "frames", args.n, args.warmup, on_stream)
                    lat, dets = r["latency_ms"], r["detections"]
                else:
                    method, aio = BARE_PATHS.get(name, (name, False))
                    if name in BARE_PATHS and aio not in bare_stubs:
                        continue
                    fn = {"in-process": inprocess, "Detect": detect, "StreamDetect": stream}[method]
                    on = (bare_stubs[aio],) if name in BARE_PATHS else ()
                    fn(args.warmup, *on)
                    lat, dets = fn(args.n, *on)
                runs[name].append(lat)
                if dets:
                    counts.setdefault(name, dets)

    ref = counts["in-process"]
    same = {k: v == ref for k, v in counts.items()}
    rows: dict[str, dict[str, Any]] = {}
    for name, per_round in runs.items():
        if not per_round:
            continue
        p50s = [statistics.median(r) for r in per_round]
        every = np.concatenate([np.asarray(r) for r in per_round])
        rows[name] = {"p50_ms": statistics.median(p50s), "p50_per_round": p50s,
                      "p99_ms": float(np.percentile(every, 99)), "calls": int(every.size)}
    base = rows["in-process"]["p50_ms"]
    tri = rows.get("Triton", {}).get("p50_ms")
    print(f"one 1280x720 JPEG per call, lockstep; model {manifest.name} ({args.model.parent.name}); "
          f"{args.threads} intra-op threads; {args.rounds} rounds x {args.n} calls; {os.cpu_count()} CPUs")
    print()
    print("| path | p50 ms (median of rounds) | p50 per round | p99 ms | x in-process | x Triton | same detections |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        vs_triton = f"{r['p50_ms'] / tri:.2f}x" if tri else "n/a"
        print(f"| {name} | {r['p50_ms']:.2f} | {' / '.join(f'{v:.2f}' for v in r['p50_per_round'])} "
              f"| {r['p99_ms']:.2f} | {r['p50_ms'] / base:.2f}x | {vs_triton} "
              f"| {'yes' if same.get(name, True) else 'NO'} |")
    tri_stream = rows.get("Triton stream", {}).get("p50_ms")
    if tri_stream and "KServe v2 stream (ours)" in rows:
        print(f"\nModelStreamInfer, ours against Triton's: "
              f"{rows['KServe v2 stream (ours)']['p50_ms'] / tri_stream:.2f}x (p50)")
    against_bare = [f"{ours} {rows[ours]['p50_ms'] / rows[name]['p50_ms']:.2f}x"
                    for name, (ours, aio) in BARE_PATHS.items() if not aio and name in rows and ours in rows]
    if against_bare:
        print("\nour server against the bare grpcio server running the same pipeline (p50): " + ", ".join(against_bare))
    aio_vs = [f"{method} {rows[name]['p50_ms'] / rows[sync]['p50_ms']:.2f}x"
              for name, (method, aio) in BARE_PATHS.items() if aio
              for sync in [f"bare grpcio {method}"] if name in rows and sync in rows]
    if aio_vs:
        print("the bare server on grpc.aio against the same on grpcio's thread pool (p50): " + ", ".join(aio_vs))
    st = {k: statistics.median(v) for k, v in stages.items()}
    inner = st["preprocess"] + st["inference"] + st["postprocess"]
    print()
    print("where a Detect call's time goes (medians, ms; the server's own stage timings of the same calls)")
    print("| decode + letterbox | inference | NMS + rest | queue / hand-offs | server total | gRPC + client "
          "(round trip - server total) | round trip |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {st['preprocess']:.2f} | {st['inference']:.2f} | {st['postprocess']:.2f} "
          f"| {st['total'] - inner:.2f} | {st['total']:.2f} | {rows['Detect']['p50_ms'] - st['total']:.2f} "
          f"| {rows['Detect']['p50_ms']:.2f} |")
    if peer is None:
        print(f"\nTriton: skipped ({why_not})")
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "same_detections": same, "triton_skipped": why_not,
                                             "detect_stages_ms": st},
                                            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
