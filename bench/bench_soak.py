"""Soak: 8 honest cameras with and without hostile streams, then 32 streams of big frames.

Every phase runs against one ``perception serve`` subprocess serving the shipped default model
(``artifacts/demo/engine`` if it was built, else built from ``models/default/detector.pt``
first), with the server's default limits except one: every client here connects from
127.0.0.1, so the per-peer stream cap is raised to the global cap (32).

1. soak, clean: 8 cameras, each its own process, stream 1280x720 JPEGs of a synthetic road at
   30 fps over StreamDetect with a send window (as ``client.stream`` does: ``send`` waits
   while the window is full; camera ticks that pass meanwhile are not sent, and counted).
2. soak, hostile: the same cameras while 4 hostile clients (one process each) run:
   a) 16 MiB garbage frames, back to back; b) truncated / corrupt JPEGs and 8 M-entry class
   filters; c) a PNG decode bomb (8192x4050 declared in ~100 KB) and progressive 4K JPEGs;
   d) an idle stream (re-opened whenever the server ends it) plus streams opened and closed
   in quick succession.
3. big frames: 32 streams each sending JPEGs just under the server's default 8 MiB message limit
   (``--big-frame-mib``, default 7.9: a 1280x720 picture padded with APP15 segments; valid, so
   each one is held, decoded and inferred) back to back. Larger frames need a raised limit
   (``--server-args '--max-message-bytes ...'``); at the default they are refused at their
   length prefix. With ``--big-unary`` the same clients send unary ``Detect`` calls back to back
   instead (one call in flight each): frames a busy engine keeps waiting after decoding them.

Reported per phase: every frame accounted for (sent = answered + unanswered), OK latency
p50 / p99 taken as each answer arrives, the cameras' OK fps and its ratio hostile / clean
(target >= 0.8), server RSS start / max / end (target < 600 MB with big frames), server
ERROR log lines and INTERNAL codes, and whether it is alive and SERVING (gRPC health) at the
end. The clients share the machine with the server: their CPU seconds are printed beside its.

    .venv/bin/python -m bench.bench_soak [--model manifest.json] [--duration-s 600]
        [--big-duration-s 60] [--big-unary] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import multiprocessing as mp
import os
import queue
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np

from bench.bench_server import READY, REPO, ServerProcess, jpeg, pct, road_frame

METHOD = "/perception.v1.Detector/StreamDetect"
UNARY_METHOD = "/perception.v1.Detector/Detect"
MIB = 1 << 20
DEMO_MANIFEST = REPO / "artifacts/demo/engine/manifest.json"
DRAIN_S = 15.0  # after a phase's sending ends, how long its in-flight frames may take to be answered
HOSTILE = ("garbage", "corrupt", "bomb", "idle")
Worker = tuple[Callable[..., None], tuple[Any, ...]]


@dataclass
class Tally:
    """What one client saw. Each field is written by one thread only (sender or receiver)."""

    streams: int = 0  # StreamDetect calls opened
    sent: int = 0
    answered: int = 0
    unanswered: int = 0  # sent on a stream that ended without answering them
    statuses: Counter[str] = field(default_factory=Counter)  # answers by FrameStatus
    errors: Counter[str] = field(default_factory=Counter)  # gRPC codes that ended a stream (or a unary call)
    ok_ms: list[float] = field(default_factory=list)  # send -> answer, OK frames
    skipped: int = 0  # camera ticks not sent because the window was full
    cpu_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the queue to the parent (``dataclasses.asdict`` mangles a Counter)."""
        return {**self.__dict__, "statuses": dict(self.statuses), "errors": dict(self.errors)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tally:
        return cls(**{**d, "statuses": Counter(d["statuses"]), "errors": Counter(d["errors"])})

    def add(self, other: Tally) -> Tally:
        for name in ("streams", "sent", "answered", "unanswered", "skipped", "cpu_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.statuses.update(other.statuses)
        self.errors.update(other.errors)
        self.ok_ms += other.ok_ms
        return self


def merged(tallies: Iterable[Tally]) -> Tally:
    out = Tally()
    for t in tallies:
        out.add(t)
    return out


# -- payloads ------------------------------------------------------------------------------


def request_bytes(camera: str, data: bytes, class_filter: int = 0) -> bytes:
    """A serialized DetectRequest, built once and sent many times (no per-frame copy here)."""
    from perception.v1 import detector_pb2 as pb

    req = pb.DetectRequest(frame=pb.Frame(camera_id=camera, encoded=data))
    if class_filter:
        req.options.class_filter.extend([0] * class_filter)
    return req.SerializeToString()


def padded_jpeg(data: bytes, size: int) -> bytes:
    """A valid JPEG of exactly ``size`` bytes: ``data`` with APP15 segments after its SOI."""
    pad, segs = size - len(data), []
    while pad > 0:
        body = min(65533, pad - 4)  # a segment is marker (2) + length (2) + body
        if pad - (body + 4) in (1, 2, 3):  # leave room for a last whole segment
            body -= 4
        segs.append(b"\xff\xef" + struct.pack(">H", body + 2) + bytes(body))
        pad -= body + 4
    return data[:2] + b"".join(segs) + data[2:]


def png_bomb(w: int = 8192, h: int = 4050) -> bytes:
    """A small PNG declaring w x h: one IDAT of zeros, compressed row by row (a decode bomb)."""
    z = zlib.compressobj(9)
    row = bytes(w * 3 + 1)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def hostile_payloads(kind: str) -> list[bytes]:
    cam = f"hostile-{kind}"
    good = jpeg(road_frame(1280, 720, seed=99))
    if kind == "garbage":
        rng = np.random.default_rng(0)
        return [request_bytes(cam, b"\xff\xd8" + bytes(16 * MIB - 2)),
                request_bytes(cam, b"\xff\xd8" + rng.bytes(16 * MIB - 2))]
    if kind == "corrupt":
        sof = good.index(b"\xff\xc0")
        flipped = bytearray(good)
        for i in np.random.default_rng(1).integers(len(good) // 4, len(good) - 4, 64):
            flipped[i] ^= 0x5A
        return [request_bytes(cam, good[: int(len(good) * 0.6)] + b"\xff\xd9"),
                request_bytes(cam, good[: sof + 5] + struct.pack(">HH", 4050, 8192) + good[sof + 9:]),
                request_bytes(cam, bytes(flipped)),
                request_bytes(cam, good, class_filter=8_000_000)]
    if kind == "bomb":
        progressive = cv2.imencode(".jpg", road_frame(3840, 2160, seed=7),
                                   [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        return [request_bytes(cam, png_bomb()), request_bytes(cam, progressive)]
    return [request_bytes(cam, jpeg(road_frame(640, 360, seed=5)))]


# -- client streams (run inside the client processes) ---------------------------------------


def _status(code: int) -> str:
    from perception.v1 import detector_pb2 as pb

    return pb.FrameStatus.Name(code).removeprefix("FRAME_STATUS_")


def _raw_stream(channel: grpc.Channel) -> Any:
    """StreamDetect taking pre-serialized requests (no serializer: bytes go as they are)."""
    from perception.v1 import detector_pb2 as pb

    return channel.stream_stream(METHOD, request_serializer=None, response_deserializer=pb.DetectResponse.FromString)


def _pause_before_retry(end: float) -> None:
    time.sleep(min(0.1, max(0.0, end - time.perf_counter())))  # as the client library backs off


def _silent(until: threading.Event, seconds: float) -> Iterator[bytes]:
    """A request stream that sends nothing, open until ``until`` is set (or ``seconds`` pass)."""
    until.wait(seconds)
    return
    yield b""  # makes this a generator


def _one_then_silent(frame: bytes, until: threading.Event, seconds: float) -> Iterator[bytes]:
    yield frame
    until.wait(seconds)


class _Backlog:
    """The frames one stream was handed, as its sender and receiver threads see them: once
    ``close``d, the sender hands over nothing more, so sent = answered + unanswered exactly."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = False
        self.sent = 0

    def take(self) -> bool:
        with self.lock:
            if self.closed:
                return False
            self.sent += 1
            return True

    def close(self) -> int:
        with self.lock:
            self.closed = True
            return self.sent


def _back_to_back(payloads: Sequence[bytes], end: float, backlog: _Backlog) -> Iterator[bytes]:
    i = 0
    while time.perf_counter() < end and backlog.take():
        yield payloads[i % len(payloads)]
        i += 1


def firehose(channel: grpc.Channel, payloads: Sequence[bytes], end: float, t: Tally) -> None:
    """Send payloads back to back (as fast as the server reads them) until ``end``; re-open
    any stream the server ends."""
    stream = _raw_stream(channel)
    while time.perf_counter() < end:
        t.streams += 1
        backlog, answered = _Backlog(), 0
        try:
            for resp in stream(_back_to_back(payloads, end, backlog),
                               timeout=max(0.1, end - time.perf_counter()) + DRAIN_S):
                answered += 1
                t.statuses[_status(resp.status)] += 1
        except grpc.RpcError as exc:
            t.errors[exc.code().name] += 1
        sent = backlog.close()
        t.sent += sent
        t.answered += answered
        t.unanswered += sent - answered
        _pause_before_retry(end)


def firehose_unary(channel: grpc.Channel, payloads: Sequence[bytes], end: float, t: Tally) -> None:
    """Unary ``Detect`` calls back to back, one in flight, until ``end``. A call that fails is
    counted sent, unanswered, and by its code (``errors``)."""
    from perception.v1 import detector_pb2 as pb

    detect: Any = channel.unary_unary(UNARY_METHOD, request_serializer=None,
                                      response_deserializer=pb.DetectResponse.FromString)
    while time.perf_counter() < end:
        for payload in payloads:
            t.sent += 1
            try:
                resp = detect(payload, timeout=max(0.1, end - time.perf_counter()) + DRAIN_S)
            except grpc.RpcError as exc:
                t.errors[exc.code().name] += 1
                t.unanswered += 1
                _pause_before_retry(end)
                continue
            t.answered += 1
            t.statuses[_status(resp.status)] += 1


def idle_streams(channel: grpc.Channel, end: float, t: Tally) -> None:
    """Hold a stream that sends nothing; when the server ends it, open the next one."""
    stream = _raw_stream(channel)
    while time.perf_counter() < end:
        t.streams += 1
        quiet = threading.Event()
        try:
            for resp in stream(_silent(quiet, max(0.0, end - time.perf_counter())),
                               timeout=max(0.1, end - time.perf_counter()) + DRAIN_S):
                t.statuses[_status(resp.status)] += 1
        except grpc.RpcError as exc:
            t.errors[exc.code().name] += 1
        quiet.set()
        _pause_before_retry(end)


def open_close_streams(channel: grpc.Channel, end: float, per_s: float, frame: bytes, t: Tally) -> None:
    """``per_s`` streams a second, each closed at once, in turn: half-closed before sending
    anything, cancelled just after sending a frame (never answered: not counted as sent),
    cancelled before sending anything."""
    stream = _raw_stream(channel)
    tick = time.perf_counter()
    while time.perf_counter() < end:
        hold = threading.Event()
        mode = t.streams % 3
        t.streams += 1
        try:
            if mode == 0:
                for resp in stream(iter(()), timeout=5):
                    t.statuses[_status(resp.status)] += 1
            elif mode == 1:
                call = stream(_one_then_silent(frame, hold, 5), timeout=5)
                time.sleep(0.005)  # the frame is on its way
                call.cancel()
            else:
                stream(_silent(hold, 5), timeout=5).cancel()
        except grpc.RpcError as exc:
            t.errors[exc.code().name] += 1
        hold.set()
        tick = max(tick + 1.0 / per_s, time.perf_counter() - 1.0)
        time.sleep(max(0.0, min(tick, end) - time.perf_counter()))


class CameraWindow:
    """One honest camera's stream: a frame every 1/fps s while fewer than ``window`` are
    unanswered (``send`` waits, as the client library's does; the ticks that pass meanwhile are
    not sent, and counted), and each frame's send time until its answer arrives."""

    def __init__(self, cam: int, frames: Sequence[bytes], fps: float, window: int, end: float, t: Tally,
                 deadline_ms: int = 0) -> None:
        self.cam, self.frames, self.fps, self.end, self.t = cam, frames, fps, end, t
        self.deadline_ms = deadline_ms
        self.lock = threading.Lock()
        self.in_flight: dict[int, float] = {}
        self.credits = threading.Semaphore(window)
        self.broken = False
        self.seq = 0

    def requests(self) -> Iterator[Any]:
        from perception.v1 import detector_pb2 as pb

        tick = time.perf_counter()
        while True:
            time.sleep(max(0.0, min(tick, self.end) - time.perf_counter()))
            while not self.credits.acquire(timeout=0.05):
                if self.broken or time.perf_counter() >= self.end:
                    return
            now = time.perf_counter()
            late = int((now - tick) * self.fps)  # whole frame periods spent waiting for the window
            self.t.skipped += late
            tick += (late + 1) / self.fps
            with self.lock:
                if self.broken or now >= self.end:
                    return
                self.in_flight[self.seq] = now
            frame = pb.Frame(camera_id=f"cam{self.cam}", sequence=self.seq, capture_timestamp_ns=time.time_ns(),
                             encoded=self.frames[self.seq % len(self.frames)], deadline_ms=self.deadline_ms)
            self.seq += 1
            self.t.sent += 1
            yield pb.DetectRequest(frame=frame)

    def answered(self, sequence: int, status: str, arrived: float) -> None:
        with self.lock:
            sent_at = self.in_flight.pop(sequence, None)
        self.credits.release()
        self.t.answered += 1
        self.t.statuses[status] += 1
        if status == "OK" and sent_at is not None:
            self.t.ok_ms.append((arrived - sent_at) * 1e3)

    def stream_ended(self) -> None:
        """The stream is over: what it still held is unanswered; a new stream starts afresh."""
        with self.lock:
            self.broken = True
            self.t.unanswered += len(self.in_flight)
            self.in_flight.clear()


def camera_stream(stub: Any, cam: int, frames: Sequence[bytes], fps: float, window: int, end: float,
                  t: Tally, deadline_ms: int = 0) -> None:
    """An honest camera until ``end``: latency from handing a frame to gRPC to its answer's
    arrival. A broken stream is re-opened; the frames it held are counted unanswered."""
    seq = 0
    while time.perf_counter() < end:
        t.streams += 1
        cw = CameraWindow(cam, frames, fps, window, end, t, deadline_ms)
        cw.seq = seq
        try:
            for resp in stub.StreamDetect(cw.requests(), timeout=max(0.1, end - time.perf_counter()) + DRAIN_S):
                cw.answered(resp.sequence, _status(resp.status), time.perf_counter())
        except grpc.RpcError as exc:
            t.errors[exc.code().name] += 1
        cw.stream_ended()
        seq = cw.seq
        _pause_before_retry(end)


# -- client processes: set up, report ready, wait for the start, run, report ------------------


Jobs = Callable[[float], list[tuple[str, Callable[[Tally], None]]]]  # end time -> (label, run(tally)) per thread


def client_process(role: str, setup: Callable[[], Jobs], seconds: float, start: Event, out: Queue[Any]) -> None:
    """The life of a client process: set up (frames, channels), report ready, wait for the
    phase to start, run every job in its own thread until ``seconds`` pass, report its tallies."""
    try:
        jobs = setup()
        out.put(("ready", role))
        start.wait()
        cpu0, end = time.process_time(), time.perf_counter() + seconds
        todo = jobs(end)
        tallies = {label: Tally() for label, _ in todo}
        threads = [threading.Thread(target=run, args=(tallies[label],), daemon=True) for label, run in todo]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        first = next(iter(tallies.values()))
        first.cpu_s = time.process_time() - cpu0
        out.put(("done", role, {label: t.to_dict() for label, t in tallies.items()}))
    except KeyboardInterrupt:
        return
    except Exception as exc:  # reported to the parent, which prints it beside the numbers
        out.put(("failed", role, f"{type(exc).__name__}: {exc}"))


def honest_process(address: str, cam: int, fps: float, window: int, deadline_ms: int, seconds: float,
                   start: Event, out: Queue[Any]) -> None:
    def setup() -> Jobs:
        from perception.v1 import detector_pb2_grpc as pb_grpc

        frames = [jpeg(road_frame(1280, 720, seed=cam * 8 + k)) for k in range(8)]
        channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = pb_grpc.DetectorStub(channel)
        return lambda end: [("camera", functools.partial(camera_stream, stub, cam, frames, fps, window, end,
                                                         deadline_ms=deadline_ms))]

    client_process(f"cam{cam}", setup, seconds, start, out)


def hostile_process(kind: str, address: str, seconds: float, open_close_per_s: float, start: Event,
                    out: Queue[Any]) -> None:
    def setup() -> Jobs:
        payloads = hostile_payloads(kind)
        channel = grpc.insecure_channel(address)

        def jobs(end: float) -> list[tuple[str, Callable[[Tally], None]]]:
            if kind == "idle":
                return [("d) idle stream", functools.partial(idle_streams, channel, end)),
                        ("d) open/close", functools.partial(open_close_streams, channel, end, open_close_per_s,
                                                            payloads[0]))]
            label = {"garbage": "a) 16 MiB garbage", "corrupt": "b) corrupt JPEG, class filter",
                     "bomb": "c) PNG bomb, progressive 4K"}[kind]
            return [(label, functools.partial(firehose, channel, payloads, end))]

        return jobs

    client_process(kind, setup, seconds, start, out)


def big_process(address: str, index: int, streams: int, frame_mib: float, seconds: float, unary: bool,
                start: Event, out: Queue[Any]) -> None:
    send = firehose_unary if unary else firehose

    def setup() -> Jobs:
        data = padded_jpeg(jpeg(road_frame(1280, 720, seed=index)), int(frame_mib * MIB))
        payload = [request_bytes(f"big{index}", data)]
        # A subchannel pool of each channel's own: one HTTP/2 connection per stream, as separate clients.
        channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(streams)]
        return lambda end: [(f"big{index}.{i}", functools.partial(send, ch, payload, end))
                            for i, ch in enumerate(channels)]

    client_process(f"big{index}", setup, seconds, start, out)


# -- the server side ----------------------------------------------------------------------


def health(address: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        check = health_pb2_grpc.HealthStub(ch).Check  # type: ignore[attr-defined]  # the stubs omit HealthStub's RPCs
        try:
            status: int = check(health_pb2.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError as exc:
            return f"unreachable ({exc.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


def grpc_error_counts(metrics_port: int) -> Counter[str]:
    """perception_grpc_errors_total from /metrics, as "method code" -> count ({} if unreachable)."""
    out: Counter[str] = Counter()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        m = re.match(r'perception_grpc_errors_total\{(.*)\} (\S+)', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[f"{labels.get('method', '?')} {labels.get('code', '?')}"] += int(float(m.group(2)))
    return out


class Server:
    """The served process: RSS, CPU, log and health as a phase sees them."""

    def __init__(self, manifest: Path, threads: int, extra: list[str], repo: Path = REPO) -> None:
        self.proc = ServerProcess(manifest, threads, extra, repo)
        self.address = f"127.0.0.1:{self.proc.port}"
        ready = next((m for m in map(READY.search, self.proc.log) if m), None)
        self.metrics_port = int(ready.group(4)) if ready else 0
        import psutil

        self.ps = psutil.Process(self.proc.proc.pid)

    def rss_mb(self) -> float:
        try:
            return float(self.ps.memory_info().rss / 1e6)
        except Exception:  # psutil.Error once it has exited
            return float("nan")

    def cpu_s(self) -> float:
        try:
            c = self.ps.cpu_times()
            return float(c.user + c.system)
        except Exception:
            return float("nan")

    def reset_peak(self) -> None:
        """Zero the kernel's peak-RSS mark (VmHWM), so a phase reads its own peak."""
        with contextlib.suppress(OSError):  # not Linux, or not allowed: the sampled max remains
            Path(f"/proc/{self.ps.pid}/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        try:
            status = Path(f"/proc/{self.ps.pid}/status").read_text()
        except OSError:
            return float("nan")
        m = re.search(r"VmHWM:\s+(\d+) kB", status)
        return int(m.group(1)) * 1024 / 1e6 if m else float("nan")

    def variant(self) -> str:
        for line in self.proc.log:
            m = re.search(r"using backend (\S+) for variant (\S+)", line)
            if m:
                return f"{m.group(2)} on {m.group(1)}"
        return "?"

    def stop(self) -> int | None:
        p = self.proc.proc
        if p.poll() is None:
            p.terminate()
            try:
                return p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        return p.wait(10)


@dataclass
class Phase:
    name: str
    seconds: float
    tallies: dict[str, Tally]  # label -> everything the clients with that label saw
    rss_start: float
    rss_max: float
    rss_peak: float
    rss_end: float
    server_cpu_s: float
    error_lines: list[str]
    codes: dict[str, int]  # gRPC errors the server counted in this phase
    alive: bool
    health: str
    failures: list[str]
    load_1m: float  # the machine's 1-minute load average at the end: anything else running shows here


class Harness:
    """Runs phases of client processes against one server; kills every one of them at the end."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.ctx = mp.get_context("spawn")
        self.children: list[BaseProcess] = []

    def run(self, name: str, seconds: float, workers: list[Worker]) -> Phase:
        from tqdm import tqdm

        self.check_alive(name)
        q: Queue[Any] = self.ctx.Queue()
        start = self.ctx.Event()
        procs = [self.ctx.Process(target=fn, args=(*a, start, q), daemon=True) for fn, a in workers]
        for p in procs:
            p.start()
            self.children.append(p)
        failures: list[str] = []
        ready, deadline = 0, time.monotonic() + 180
        while ready < len(procs):
            self.check_alive(name)
            if time.monotonic() > deadline or not any(p.is_alive() for p in procs):
                raise RuntimeError(f"{name}: only {ready} of {len(procs)} clients started: {failures}")
            try:
                msg = q.get(timeout=1.0)
            except queue.Empty:
                continue
            if msg[0] == "ready":
                ready += 1
            else:
                failures.append(f"{msg[1]}: {msg[2]}")
        srv = self.server
        srv.reset_peak()
        rss0, cpu0, log0, codes0 = srv.rss_mb(), srv.cpu_s(), len(srv.proc.log), grpc_error_counts(srv.metrics_port)
        start.set()
        t0 = time.monotonic()
        rss_max, reports = rss0, 0
        tallies: dict[str, Tally] = {}
        with tqdm(total=round(seconds), desc=name, mininterval=5.0, file=sys.stderr,
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s {postfix}") as bar:
            while reports < len(procs) and time.monotonic() < t0 + seconds + DRAIN_S + 30:
                try:
                    msg = q.get(timeout=0.5)
                except queue.Empty:
                    if not any(p.is_alive() for p in procs) and q.empty():
                        break
                else:
                    reports += 1
                    if msg[0] == "done":
                        for label, d in msg[2].items():
                            tallies.setdefault(label, Tally()).add(Tally.from_dict(d))
                    else:
                        failures.append(f"{msg[1]}: {msg[2]}")
                rss = srv.rss_mb()
                rss_max = max(rss_max, rss)
                bar.set_postfix_str(f"server RSS {rss:.0f} MB", refresh=False)
                bar.update(min(round(seconds), round(time.monotonic() - t0)) - bar.n)
        for p in procs:
            p.join(5)
        missing = len(procs) - reports
        if missing:
            failures.append(f"{missing} client processes sent no report")
        self.kill(procs)
        errors = [ln.rstrip() for ln in srv.proc.log[log0:] if " ERROR " in ln or " CRITICAL " in ln]
        codes = {k: v for k, v in (grpc_error_counts(srv.metrics_port) - codes0).items() if v}
        return Phase(name, seconds, tallies, rss0, rss_max, srv.peak_mb(), srv.rss_mb(), srv.cpu_s() - cpu0, errors,
                     codes, srv.proc.proc.poll() is None, health(srv.address), failures, os.getloadavg()[0])

    def check_alive(self, name: str) -> None:
        code = self.server.proc.proc.poll()
        if code is not None:
            self.kill()
            tail = "".join(self.server.proc.log[-5:])
            raise RuntimeError(f"{name}: the server exited with code {code} before the phase started:\n{tail}")

    def kill(self, procs: Sequence[BaseProcess] | None = None) -> None:
        for p in procs if procs is not None else self.children:
            if p.is_alive():
                p.terminate()
                p.join(3)
            if p.is_alive():
                p.kill()
                p.join(3)


# -- report -------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def counts(c: Counter[str]) -> str:
    return " ".join(f"{k}={v}" for k, v in c.most_common()) or "-"


def mb(x: float) -> str:
    return "?" if x != x else f"{x:.0f}"


def camera_row(p: Phase) -> list[object]:
    t = p.tallies.get("camera", Tally())
    ok = t.statuses["OK"]
    return [p.name, t.sent, t.answered, t.unanswered, ok, t.statuses["DROPPED_STALE"], t.statuses["OVERLOADED"],
            t.statuses["INVALID"], t.statuses["EXPIRED"], t.skipped, f"{ok / p.seconds:.1f}", f"{pct(t.ok_ms, 50):.1f}",
            f"{pct(t.ok_ms, 99):.1f}", counts(t.errors)]


def server_row(p: Phase) -> list[object]:
    clients_cpu = sum(t.cpu_s for t in p.tallies.values())
    internal = sum(v for k, v in p.codes.items() if k.endswith(" INTERNAL"))
    return [p.name, f"{mb(p.rss_start)} / {mb(p.rss_max)} / {mb(p.rss_peak)} / {mb(p.rss_end)}",
            f"{p.server_cpu_s:.0f}", f"{clients_cpu:.0f}", len(p.error_lines), internal,
            "yes" if p.alive else "NO", p.health, f"{p.load_1m:.1f}"]


def report(phases: dict[str, Phase], target_mb: float, big_unary: bool = False) -> None:
    soak = [phases[k] for k in ("clean", "hostile") if k in phases]
    if soak:
        print("\nhonest cameras (latency: frame handed to gRPC -> its answer arrives, OK frames only; "
              "skipped: camera ticks not sent while the window was full)")
        print(table(["phase", "sent", "answered", "unanswered", "OK", "stale", "overloaded", "invalid", "expired",
                     "skipped", "OK fps", "p50 ms", "p99 ms", "stream errors"], [camera_row(p) for p in soak]))
    if "clean" in phases and "hostile" in phases:
        ok = [phases[k].tallies.get("camera", Tally()).statuses["OK"] / phases[k].seconds for k in ("clean", "hostile")]
        print(f"OK throughput with hostile / without: {ok[1] / ok[0] if ok[0] else float('nan'):.3f} (target >= 0.8)")
    hostile = sorted((label, t) for label, t in phases["hostile"].tallies.items()
                     if label != "camera") if "hostile" in phases else []
    rows = [[label, t.streams, t.sent, t.answered, t.unanswered, counts(t.statuses), counts(t.errors)]
            for label, t in hostile]
    if "big" in phases:
        t = merged(phases["big"].tallies.values())
        rows.append([f"big: {len(phases['big'].tallies)} {'unary callers' if big_unary else 'streams'}",
                     "-" if big_unary else t.streams, t.sent, t.answered, t.unanswered,
                     counts(t.statuses), counts(t.errors)])
    if rows:
        print("\nhostile and big-frame streams (stream errors: the codes that ended a stream, or a unary call; "
              "CANCELLED: ours)")
        print(table(["client", "streams", "sent", "answered", "unanswered", "answers", "stream errors"], rows))
    print("\nserver (RSS MB start / max sampled each 0.5 s / peak VmHWM / end; CPU s in the phase)")
    print(table(["phase", "RSS MB", "server CPU s", "clients CPU s", "ERROR lines", "INTERNAL", "alive", "health",
                 "load 1m"],
                [server_row(p) for p in phases.values()]))
    if "big" in phases:
        big = phases["big"]
        print(f"big frames: server RSS max {mb(max(big.rss_max, big.rss_peak))} MB (target < {target_mb:.0f} MB)")
    for p in phases.values():
        codes = " ".join(f"{k}={v}" for k, v in sorted(p.codes.items())) or "none"
        print(f"{p.name}: gRPC errors the server counted: {codes}")
        for line in p.error_lines[:5]:
            print(f"{p.name}: server log: {line[:200]}")
        for f in p.failures:
            print(f"{p.name}: client failure: {f}")


def phase_json(p: Phase) -> dict[str, Any]:
    """The phase as JSON: latencies as their count and percentiles, not every sample."""
    tallies = {k: {**t.to_dict(), "ok_ms": len(t.ok_ms), "ok_p50_ms": pct(t.ok_ms, 50),
                   "ok_p99_ms": pct(t.ok_ms, 99)} for k, t in p.tallies.items()}
    return {**{f.name: getattr(p, f.name) for f in dataclasses.fields(p)}, "tallies": tallies}


# -- entry point --------------------------------------------------------------------------


def resolve_model(model: str | None, tmp: Path) -> Path:
    if model:
        return Path(model)
    if DEMO_MANIFEST.is_file():
        return DEMO_MANIFEST
    out = tmp / "engine"
    print(f"building the shipped default model into {out} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "perception.cli", "build", "--out", str(out), "--no-report", "--no-scaling",
                    "--checkpoint", str(REPO / "models/default/detector.pt")], cwd=REPO, check=True)
    return out / "manifest.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", help=f"manifest.json to serve (default: {DEMO_MANIFEST.relative_to(REPO)} if it exists, "
                      "else the default model built into a temp dir)")
    a("--duration-s", type=float, default=600.0, help="length of each soak phase (clean, hostile)")
    a("--big-duration-s", type=float, default=60.0, help="length of the big-frame phase")
    a("--warmup-s", type=float, default=5.0, help="cameras stream this long first, not reported")
    a("--cameras", type=int, default=8)
    a("--fps", type=float, default=30.0)
    a("--window", type=int, default=4, help="frames in flight per camera (the client library's default)")
    a("--deadline-ms", type=int, default=0,
      help="each honest camera's per-frame deadline (Frame.deadline_ms; the client library's "
           "ClientConfig.deadline_ms): a frame whose deadline passes in the server (queued, or during its "
           "inference) is answered EXPIRED. 0 (default): none")
    a("--open-close-per-s", type=float, default=50.0, help="rate of hostile (d)'s stream open/close")
    a("--big-streams", type=int, default=32)
    a("--big-processes", type=int, default=4, help="client processes the big-frame streams are spread over")
    a("--big-frame-mib", type=float, default=7.9, help="size of each big frame (default: under the 8 MiB limit)")
    a("--big-unary", action="store_true",
      help="the big-frame clients send unary Detect calls back to back instead of streams")
    a("--big-target-mb", type=float, default=600.0)
    a("--threads", type=int, default=0, help="server inference threads per batch (default: the server's choice)")
    a("--max-streams-per-peer", type=int, default=32,
      help="server per-peer stream cap: every client here is 127.0.0.1 (server default 8); 0: flag not passed")
    a("--server-repo", type=Path, default=REPO,
      help="run the server of this checkout (e.g. a git worktree of an older commit) to compare against its "
           "past; --model must then be a manifest that checkout can load")
    a("--server-args", default="", help="more `perception serve` flags, e.g. '--decode-threads 1'")
    a("--only", nargs="*", choices=("soak", "big"), help="run only these phases")
    a("--hostile", nargs="*", choices=HOSTILE, default=list(HOSTILE),
      help="hostile clients of the hostile phase (default: all four), to tell which one costs what; "
           "given with none, the hostile phase is skipped")
    a("--json-out", help="write the results here as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    which = set(args.only or ("soak", "big"))
    phases: dict[str, Phase] = {}
    server: Server | None = None
    harness: Harness | None = None
    code, exit_code = 0, None

    def on_sigterm(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # the same clean-up as Ctrl-C: every client and the server are stopped

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            manifest = resolve_model(args.model, Path(tmp))
            extra = ["--max-streams-per-peer", str(args.max_streams_per_peer)] if args.max_streams_per_peer else []
            extra += args.server_args.split()
            server = Server(manifest, args.threads, extra, args.server_repo.resolve())
            harness = Harness(server)
            addr = server.address
            print(f"model {manifest} ({server.variant()}); server {addr} pid {server.ps.pid}, flags {' '.join(extra)}; "
                  f"{os.cpu_count()} cores shared by server and clients (load average {os.getloadavg()[0]:.1f})",
                  flush=True)

            def cameras(seconds: float) -> list[Worker]:
                return [(honest_process, (addr, c, args.fps, args.window, args.deadline_ms, seconds))
                        for c in range(args.cameras)]

            if "soak" in which:
                if args.warmup_s > 0:
                    harness.run("warm-up", args.warmup_s, cameras(args.warmup_s))
                phases["clean"] = harness.run("clean", args.duration_s, cameras(args.duration_s))
                hostile = [(hostile_process, (k, addr, args.duration_s, args.open_close_per_s)) for k in args.hostile]
                if hostile:
                    phases["hostile"] = harness.run("hostile", args.duration_s, cameras(args.duration_s) + hostile)
            if "big" in which:
                n, k = args.big_streams, max(1, min(args.big_processes, args.big_streams))
                split = [n // k + (i < n % k) for i in range(k)]
                phases["big"] = harness.run("big", args.big_duration_s, [
                    (big_process, (addr, i, s, args.big_frame_mib, args.big_duration_s, args.big_unary))
                    for i, s in enumerate(split)])
        except KeyboardInterrupt:
            print("interrupted: stopping every client and the server", file=sys.stderr)
            code = 130
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"bench_soak: {exc}", file=sys.stderr)
            code = 1
        finally:
            if harness is not None:
                harness.kill()
            exit_code = server.stop() if server is not None else None
            signal.signal(signal.SIGTERM, previous)
    if phases:
        report(phases, args.big_target_mb, args.big_unary)
        print(f"server exit code after SIGTERM: {exit_code}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({n: phase_json(p) for n, p in phases.items()}, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
