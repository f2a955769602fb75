"""Lifecycle under load: graceful degradation (``--degrade auto`` vs off) and camera priorities.

Each run has a fresh ``perception serve`` subprocess on 127.0.0.1 serving the shipped default
model (``artifacts/demo/engine`` if it was built, else built from ``models/default/detector.pt``
first), and one process per camera streaming 1280x720 JPEGs over StreamDetect with a send
window, as ``bench_soak`` does (its camera, client-process and server helpers are used here).
Every answer is logged with its send and arrival time, status and ``model_variant``.

1. degradation: 8 cameras step 10 fps -> 30 fps -> 10 fps (``--phase-s`` each), once with
   ``--degrade auto`` and once with it off. The server serves the reference ``fp32`` variant
   (else the slowest gated ONNX one), so that there are lighter variants to degrade to.
   Per phase: OK throughput, OK-frame p99 (frame handed to gRPC -> its answer arrives), shed
   rate (non-OK answers / answers), the variants that answered; for auto, the time from the
   start of the 30 fps phase to the first degraded answer and from the start of the last 10 fps
   phase to the first answer a rung up and the first of the configured variant.
   Target: the shed rate at 8 x 30 fps at least halves with auto.
2. priorities: 8 cameras at 30 fps, ``cam0=critical`` and the other seven ``best_effort``, vs
   the same without priorities (the degradation runs' variant unless ``--priority-variant``: the
   manifest's default serves all 8 x 30 fps on 2 cores, so its runs would not overload).
   Reported: the critical camera's OK share and p99, the best-effort cameras' OK throughput
   (starvation). Target: >= 95 % of the critical camera's frames OK while the seven overload.

Frames are attributed to the phase in which they were sent. Clients share the machine with the
server; the 1-minute load average is printed beside each run, and the share of the run the
server's inference workers were busy (from its /metrics; summed over the workers, so up to
100 % per worker): where it is low, a lighter variant cannot relieve the server.

    .venv/bin/python -m bench.bench_lifecycle [--model manifest.json] [--phase-s 60]
        [--only degrade priorities] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.bench_server import jpeg, pct, road_frame
from bench.bench_soak import (
    DRAIN_S,
    CameraWindow,
    Harness,
    Jobs,
    Phase,
    Server,
    Tally,
    client_process,
    counts,
    resolve_model,
    server_row,
    table,
)
from perception.errors import PerceptionError

Schedule = tuple[tuple[float, float], ...]  # (seconds, fps) per phase, in order
UNANSWERED = "UNANSWERED"
# After a swap the old model answers only the batches already prepared for it: one batch took
# 70-100 ms in this bench's runs (its "inference busy" lines); 1 s is ample.
SWAP_TAIL_S = 1.0


# -- cameras (run inside the client processes) ----------------------------------------------


@dataclass
class FrameLog:
    """Every frame one camera sent: times in seconds from the run's start (arrived: NaN when
    the stream ended without an answer), answer status, and the variant that answered."""

    sent: list[float] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    variant: list[str] = field(default_factory=list)
    wall_t0: float = 0.0  # time.time() at the run's start, to place the server's log lines

    def add(self, sent: float, arrived: float, status: str, variant: str) -> None:
        self.sent.append(sent)
        self.arrived.append(arrived)
        self.status.append(status)
        self.variant.append(variant)


class ScheduledWindow(CameraWindow):
    """bench_soak's camera window whose frame rate follows a schedule, logging every frame."""

    def __init__(self, cam: int, frames: Sequence[bytes], schedule: Schedule, t0: float, window: int,
                 end: float, t: Tally, frame_log: FrameLog) -> None:
        self.schedule, self.t0, self.frame_log = schedule, t0, frame_log
        super().__init__(cam, frames, schedule[0][1], window, end, t)

    @property  # the base class's plain attribute: here the schedule's rate at this moment
    def fps(self) -> float:
        elapsed = time.perf_counter() - self.t0
        for seconds, fps in self.schedule:
            if elapsed < seconds:
                return fps
            elapsed -= seconds
        return self.schedule[-1][1]

    @fps.setter
    def fps(self, _value: float) -> None:
        """The schedule sets the rate (the base class assigns its starting one)."""

    def answered_by(self, sequence: int, status: str, variant: str, arrived: float) -> None:
        with self.lock:
            sent_at = self.in_flight.get(sequence)
        if sent_at is not None:
            self.frame_log.add(sent_at - self.t0, arrived - self.t0, status, variant)
        self.answered(sequence, status, arrived)

    def stream_ended(self) -> None:
        with self.lock:
            held = list(self.in_flight.values())
        for sent_at in held:
            self.frame_log.add(sent_at - self.t0, float("nan"), UNANSWERED, "")
        super().stream_ended()


def scheduled_camera(stub: Any, cam: int, frames: Sequence[bytes], schedule: Schedule, window: int, end: float,
                     log_path: str, t: Tally) -> None:
    """A camera following ``schedule`` until ``end`` (a broken stream is re-opened); its frame
    log is written to ``log_path`` as JSON when it is done."""
    from perception.v1 import detector_pb2 as pb

    t0, seq = end - sum(s for s, _ in schedule), 0
    frame_log = FrameLog(wall_t0=time.time() - (time.perf_counter() - t0))
    try:
        while time.perf_counter() < end:
            t.streams += 1
            cw = ScheduledWindow(cam, frames, schedule, t0, window, end, t, frame_log)
            cw.seq = seq
            try:
                for resp in stub.StreamDetect(cw.requests(), timeout=max(0.1, end - time.perf_counter()) + DRAIN_S):
                    status = pb.FrameStatus.Name(resp.status).removeprefix("FRAME_STATUS_")
                    cw.answered_by(resp.sequence, status, resp.model_variant, time.perf_counter())
            except grpc.RpcError as exc:
                t.errors[exc.code().name] += 1
            cw.stream_ended()
            seq = cw.seq
            time.sleep(min(0.1, max(0.0, end - time.perf_counter())))  # as the client library backs off
    finally:
        Path(log_path).write_text(json.dumps(frame_log.__dict__))


def camera_process(address: str, cam: int, schedule: Schedule, window: int, log_path: str, start: Event,
                   out: Queue[Any]) -> None:
    def setup() -> Jobs:
        from perception.v1 import detector_pb2_grpc as pb_grpc

        frames = [jpeg(road_frame(1280, 720, seed=cam * 8 + k)) for k in range(8)]
        channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = pb_grpc.DetectorStub(channel)
        return lambda end: [(f"cam{cam}", functools.partial(scheduled_camera, stub, cam, frames, schedule, window,
                                                             end, log_path))]

    client_process(f"cam{cam}", setup, sum(s for s, _ in schedule), start, out)


# -- one run: a fresh server, the cameras, every frame's fate --------------------------------


@dataclass
class Run:
    name: str
    variant: str  # the configured variant
    schedule: Schedule
    phase: Phase  # bench_soak's view: tallies per camera, server RSS / CPU / errors
    frames: dict[int, FrameLog]  # camera -> its frame log
    work: dict[str, float]  # what the server's /metrics counted in the run (see server_work)
    moves: list[tuple[float, str]]  # the server's degrade / swap / rollback / refusal log lines (run time, text)


def run_once(name: str, manifest: Path, variant: str, schedule: Schedule, cameras: int, window: int,
             extra: list[str], args: argparse.Namespace, tmp: Path, keep: list[Harness]) -> Run:
    server_flags = ["--max-streams-per-peer", str(args.max_streams_per_peer), *extra, *args.server_args.split()]
    if variant:
        server_flags[:0] = ["--variant", variant]
    server = Server(manifest, args.threads, server_flags)
    harness = Harness(server)
    keep.append(harness)
    try:
        print(f"{name}: serving {server.variant()} pid {server.ps.pid}, flags {' '.join(server_flags)}", flush=True)
        logs = {c: tmp / f"{name.replace(' ', '_')}.cam{c}.json" for c in range(cameras)}
        log0, work0 = len(server.proc.log), server_work(server.metrics_port)
        phase = harness.run(name, sum(s for s, _ in schedule), [
            (camera_process, (server.address, c, schedule, window, str(logs[c]))) for c in range(cameras)])
        work = {k: v - work0.get(k, 0.0) for k, v in server_work(server.metrics_port).items()}
        frames = {c: FrameLog(**json.loads(p.read_text())) for c, p in logs.items() if p.is_file()}
        wall_t0 = min((f.wall_t0 for f in frames.values()), default=0.0)
        moves = [(log_time(ln) - wall_t0, ln.rstrip()) for ln in server.proc.log[log0:]
                 if any(k in ln for k in ("server.degrade: ", "swapped in", "rolled back to", "model load refused"))]
    finally:
        harness.kill()
        server.stop()
    return Run(name, variant, schedule, phase, frames, work, moves)


# -- analysis ---------------------------------------------------------------------------------


def server_work(metrics_port: int) -> dict[str, float]:
    """Stage-latency and batch-size sums and counts from the server's /metrics, keyed
    "stage_latency_seconds.<stage>.sum" etc. ({} if unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    pattern = r'^perception_(stage_latency_seconds|batch_size_frames)_(sum|count)(?:\{stage="(\w+)"\})? (\S+)$'
    return {f"{m[1]}.{m[3] or ''}.{m[2]}": float(m[4]) for m in re.finditer(pattern, text, re.M)}


def log_time(line: str) -> float:
    """time.time() of a server log line (text format: local time, then milliseconds); NaN if none."""
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return float("nan")


def ladder(manifest: Path) -> list[str]:
    """The manifest's gated ONNX variants, slowest first by the latency their build measured
    (the order ``server.degrade`` degrades along)."""
    from perception.manifest import VariantFormat, load_manifest

    m = load_manifest(manifest)
    ok = [v for v in m.variants if v.passed and v.format is VariantFormat.ONNX and v.latency_ms.get("p50")]
    return [v.name for v in sorted(ok, key=lambda v: -v.latency_ms.get("p50", 0.0))]


def default_degrade_variant(rungs: list[str]) -> str:
    # In the shipped manifest fp16's build p50 ties fp32's (6.26 vs 6.24 ms) and sorts above it:
    # start from the reference, so that the first degradation step is to a faster variant.
    if not rungs:
        raise RuntimeError("the manifest has no ONNX variant that passed its gate: nothing to degrade along")
    return "fp32" if "fp32" in rungs else rungs[0]


@dataclass
class Stats:
    offered: float
    sent: int
    answered: int
    ok: int
    statuses: Counter[str]
    variants: Counter[str]  # of the OK answers
    ok_ms: list[float]
    seconds: float

    @property
    def shed_rate(self) -> float:
        return (self.answered - self.ok) / self.answered if self.answered else float("nan")

    @property
    def ok_fps(self) -> float:
        return self.ok / self.seconds


def stats(run: Run, phase: int | None = None, cams: Sequence[int] | None = None) -> Stats:
    """The frames sent in ``phase`` (index into the schedule; None: all) by ``cams`` (None: all)."""
    lo = sum(s for s, _ in run.schedule[:phase]) if phase is not None else 0.0
    hi = lo + run.schedule[phase][0] if phase is not None else sum(s for s, _ in run.schedule)
    fps = run.schedule[phase][1] if phase is not None else 0.0
    chosen = [c for c in run.frames if cams is None or c in cams]
    st = Stats(len(chosen) * fps * (hi - lo), 0, 0, 0, Counter(), Counter(), [], hi - lo)
    for c in chosen:
        f = run.frames[c]
        for sent, arrived, status, variant in zip(f.sent, f.arrived, f.status, f.variant, strict=True):
            if not lo <= sent < hi:
                continue
            st.sent += 1
            st.statuses[status] += 1
            if status == UNANSWERED:
                continue
            st.answered += 1
            if status == "OK":
                st.ok += 1
                st.variants[variant or "?"] += 1
                st.ok_ms.append((arrived - sent) * 1e3)
    return st


def ok_answers(run: Run) -> Iterator[tuple[float, str]]:
    """(arrival, variant) of every OK answer of the run, in order of arrival."""
    got = [(a, v) for f in run.frames.values() for a, s, v in zip(f.arrived, f.status, f.variant, strict=True)
           if s == "OK"]
    return iter(sorted(got))


def first_after(run: Run, t: float, want: Any) -> float | None:
    """Seconds from ``t`` to the first OK answer after it whose variant satisfies ``want``."""
    return next((a - t for a, v in ok_answers(run) if a >= t and want(v)), None)


def first_step_up(run: Run, t: float, rungs: list[str]) -> float | None:
    """Seconds from ``t`` to the first OK answer from a variant above the lowest one that has
    answered since ``t``. Frames prepared before a swap are still answered by the old model
    (one batch, well under SWAP_TAIL_S): a higher variant right after a lower one appears is
    that tail, not a recovery."""
    low, since = -1, t
    for a, v in ok_answers(run):
        if a < t or v not in rungs:
            continue
        r = rungs.index(v)
        if r > low:
            low, since = r, a
        elif r < low and a - since > SWAP_TAIL_S:
            return a - t
    return None


def serving_at(run: Run, t: float) -> str:
    """The variant of the last OK answer that arrived before ``t``."""
    last = ""
    for a, v in ok_answers(run):
        if a >= t:
            break
        last = v
    return last


# -- report -----------------------------------------------------------------------------------


def fmt_pct(x: float) -> str:
    return "-" if x != x else f"{x:.1%}"


def fmt_s(x: float | None) -> str:
    return "never" if x is None else f"{x:.1f} s"


def phase_row(run: Run, i: int) -> list[object]:
    st = stats(run, i)
    return [run.name, f"{i + 1}: {run.schedule[i][1]:.0f} fps", f"{st.offered:.0f}", st.sent, st.answered, st.ok,
            fmt_pct(st.shed_rate), counts(Counter({k: v for k, v in st.statuses.items() if k != "OK"})),
            f"{st.ok_fps:.1f}", f"{pct(st.ok_ms, 50):.0f}", f"{pct(st.ok_ms, 99):.0f}", counts(st.variants)]


PHASE_HEADERS = ["run", "phase", "offered", "sent", "answered", "OK", "shed rate", "not OK", "OK fps", "p50 ms",
                 "p99 ms", "OK answers by variant"]


def report_degrade(off: Run, auto: Run, rungs: list[str]) -> None:
    print(f"\ndegradation: {len(off.frames)} cameras, phases {' -> '.join(f'{f:.0f} fps' for _, f in off.schedule)} "
          f"({off.schedule[0][0]:.0f} s each); configured variant {auto.variant}; ladder {' > '.join(rungs)}")
    print("(frames by the phase they were sent in; shed rate: non-OK answers / answers; "
          "latency: frame handed to gRPC -> its answer arrives, OK frames)")
    print(table(PHASE_HEADERS, [phase_row(r, i) for r in (off, auto) for i in range(len(r.schedule))]))
    top, starts = auto.variant, np.cumsum([0.0] + [s for s, _ in auto.schedule])
    hot = max(range(len(auto.schedule)), key=lambda i: auto.schedule[i][1])
    last, hot_name = len(auto.schedule) - 1, f"{auto.schedule[hot][1]:.0f} fps phase"

    def rank(v: str) -> int:
        return rungs.index(v) if v in rungs else -1

    def when(t: float) -> str:
        i = max(0, min(last, int(np.searchsorted(starts, t, side="right")) - 1))
        return f"phase {i + 1} + {t - starts[i]:.1f} s"

    first = first_after(auto, 0.0, lambda v: v not in ("", top))
    print(f"auto: first degraded answer of the run: {'never' if first is None else when(first)}")
    at_hot = serving_at(auto, starts[hot]) or top
    if at_hot == top:
        print(f"auto: {hot_name} start -> first degraded answer: "
              f"{fmt_s(first_after(auto, starts[hot], lambda v: v not in ('', top)))}")
    else:
        print(f"auto: already serving {at_hot} when the {hot_name} started; -> first answer a rung further down: "
              f"{fmt_s(first_after(auto, starts[hot], lambda v: rank(v) > rank(at_hot)))}")
    at_last = serving_at(auto, starts[last]) or top
    if at_last == top:
        print(f"auto: serving {top} (not degraded) when the last phase started")
    else:
        print(f"auto: last phase start (serving {at_last}) -> first answer a rung up: "
              f"{fmt_s(first_step_up(auto, starts[last], rungs))}; -> first {top} answer: "
              f"{fmt_s(first_after(auto, starts[last], lambda v: v == top))}")
    print(f"auto: serving {serving_at(auto, float('inf')) or '?'} at the end")
    for t, ln in auto.moves:
        print(f"auto: server log at {when(t) if t == t else '?'}: {ln[24:200]}")
    s_off, s_auto = stats(off, hot).shed_rate, stats(auto, hot).shed_rate
    ratio = s_auto / s_off if s_off else float("nan")
    print(f"shed rate at {len(auto.frames)} x {auto.schedule[hot][1]:.0f} fps: off {fmt_pct(s_off)}, auto "
          f"{fmt_pct(s_auto)}; auto / off = {ratio:.2f} (target <= 0.50)")


def report_priorities(plain: Run, prio: Run, critical: int) -> None:
    print(f"\npriorities: {len(prio.frames)} cameras at {prio.schedule[0][1]:.0f} fps for {prio.schedule[0][0]:.0f} s; "
          f"cam{critical} critical, the others best_effort (run 'with') or all normal ('without')")
    rows = []
    for r in (plain, prio):
        c = stats(r, 0, [critical])
        t = r.phase.tallies.get(f"cam{critical}", Tally())
        others = [k for k in r.frames if k != critical]
        be = stats(r, 0, others)
        per_cam = [stats(r, 0, [k]).ok_fps for k in others]
        rows.append([r.name, c.sent, t.skipped, c.answered, fmt_pct(c.ok / c.answered if c.answered else float("nan")),
                     fmt_pct(c.ok / (c.sent + t.skipped) if c.sent + t.skipped else float("nan")),
                     f"{pct(c.ok_ms, 50):.0f}", f"{pct(c.ok_ms, 99):.0f}", f"{be.offered / be.seconds:.0f}",
                     f"{be.ok_fps:.1f}", f"{min(per_cam, default=float('nan')):.1f}", fmt_pct(be.shed_rate),
                     counts(Counter({k: v for k, v in c.statuses.items() if k != "OK"}))])
    print(table(["run", "crit sent", "crit skipped", "crit answered", "crit OK/answered", "crit OK/ticks",
                 "crit p50 ms", "crit p99 ms", "b-e offered fps", "b-e OK fps", "b-e min cam OK fps",
                 "b-e shed rate", "crit not OK"], rows))
    c = stats(prio, 0, [critical])
    print("(not OK: DROPPED_STALE = replaced in the server's queue by the same camera's newer frame; "
          "OVERLOADED = shed over capacity)")
    print(f"critical camera OK with priorities: {fmt_pct(c.ok / c.answered if c.answered else float('nan'))} of "
          f"its answers (target >= 95.0%); skipped: camera ticks not sent while its window was full")


def report_servers(runs: Sequence[Run]) -> None:
    print("\nserver (RSS MB start / max sampled each 0.5 s / peak VmHWM / end; CPU s in the run)")
    print(table(["run", "RSS MB", "server CPU s", "clients CPU s", "ERROR lines", "INTERNAL", "alive", "health",
                 "load 1m"], [[r.name, *server_row(r.phase)[1:]] for r in runs]))
    for r in runs:
        stream_errors = sum((t.errors for t in r.phase.tallies.values()), Counter())
        unanswered = sum(t.unanswered for t in r.phase.tallies.values())
        if stream_errors or unanswered:
            print(f"{r.name}: stream errors {counts(stream_errors)}; unanswered frames {unanswered}")
        w = r.work
        batches, infer_s = w.get("batch_size_frames..count", 0.0), w.get("stage_latency_seconds.inference.sum", 0.0)
        pre_ms = 1e3 * w.get("stage_latency_seconds.preprocess.sum", 0.0) / max(
            1.0, w.get("stage_latency_seconds.preprocess.count", 0.0))
        if batches:
            print(f"{r.name}: inference busy {infer_s / r.phase.seconds:.0%} of the run (summed over the server's "
                  f"inference workers, so up to 100 % per worker): {batches:.0f} batches "
                  f"of {w.get('batch_size_frames..sum', 0.0) / batches:.1f} frames, {infer_s / batches * 1e3:.0f} ms "
                  f"each; preprocess {pre_ms:.1f} ms per OK frame")
        for line in r.phase.error_lines[:5]:
            print(f"{r.name}: server log: {line[:200]}")
        for f in r.phase.failures:
            print(f"{r.name}: client failure: {f}")


def run_json(r: Run) -> dict[str, Any]:
    phases = []
    for i in range(len(r.schedule)):
        st = stats(r, i)
        phases.append({"fps": r.schedule[i][1], "seconds": r.schedule[i][0], "offered": st.offered, "sent": st.sent,
                       "answered": st.answered, "ok": st.ok, "shed_rate": st.shed_rate, "ok_fps": st.ok_fps,
                       "ok_p50_ms": pct(st.ok_ms, 50), "ok_p99_ms": pct(st.ok_ms, 99),
                       "statuses": dict(st.statuses), "variants": dict(st.variants)})
    per_cam = {f"cam{c}": {"ok": (s := stats(r, None, [c])).ok, "answered": s.answered,
                           "ok_p99_ms": pct(s.ok_ms, 99)} for c in r.frames}
    return {"variant": r.variant, "phases": phases, "cameras": per_cam, "server_moves": r.moves,
            "server_errors": r.phase.error_lines, "load_1m": r.phase.load_1m}


# -- entry point ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", help="manifest.json to serve (default: artifacts/demo/engine/manifest.json if it exists, "
                      "else the default model built into a temp dir)")
    a("--phase-s", type=float, default=60.0, help="length of each degradation phase (10, 30, 10 fps)")
    a("--priority-s", type=float, help="length of each priorities run (default: --phase-s)")
    a("--cameras", type=int, default=8)
    a("--low-fps", type=float, default=10.0)
    a("--high-fps", type=float, default=30.0, help="the degradation bench's middle phase and the priorities bench")
    a("--window", type=int, default=4, help="frames in flight per camera (the client library's default)")
    a("--variant", help="variant served in the degradation runs (default: fp32 if it passed its gate, else the "
                        "slowest gated ONNX variant)")
    a("--priority-variant", default="", help="variant served in the priorities runs (default: --variant's "
                                              "default, heavy enough that 8 x 30 fps overloads the server)")
    a("--degrade-window-s", type=float, default=2.0, help="the degrader's window (the server's default)")
    a("--degrade-p99-budget-ms", type=float, default=0.0, help="OK-frame p99 budget (0: judge by shedding alone)")
    a("--threads", type=int, default=0, help="server inference threads per batch (default: the server's choice)")
    a("--max-streams-per-peer", type=int, default=32,
      help="server per-peer stream cap: every client here is 127.0.0.1 (server default 8)")
    a("--server-args", default="", help="more `perception serve` flags for every run")
    a("--only", nargs="*", choices=("degrade", "priorities"), help="run only these benches")
    a("--json-out", help="write the results here as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.phase_s, args.priority_s or args.phase_s, args.high_fps, args.low_fps, args.cameras, args.window) <= 0:
        parser.error("durations, rates, --cameras and --window must be positive")
    which = set(args.only or ("degrade", "priorities"))
    runs: dict[str, Run] = {}
    harnesses: list[Harness] = []
    code = 0

    def on_sigterm(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # the same clean-up as Ctrl-C: every client and the server are stopped

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            manifest = resolve_model(args.model, Path(tmp))
            rungs = ladder(manifest)
            n, lo, hi = args.cameras, args.low_fps, args.high_fps
            if "degrade" in which:
                variant = args.variant or default_degrade_variant(rungs)
                steps: Schedule = ((args.phase_s, lo), (args.phase_s, hi), (args.phase_s, lo))
                auto = ["--degrade", "auto", "--degrade-p99-budget-ms", str(args.degrade_p99_budget_ms),
                        "--degrade-window-s", str(args.degrade_window_s)]
                for name, flags in (("degrade off", []), ("degrade auto", auto)):
                    runs[name] = run_once(name, manifest, variant, steps, n, args.window, flags, args, Path(tmp),
                                          harnesses)
            if "priorities" in which:
                steady: Schedule = ((args.priority_s or args.phase_s, hi),)
                classes = ",".join(f"cam{c}={'critical' if c == 0 else 'best_effort'}" for c in range(n))
                # The default variant serves 8 x 30 fps whole on 2 cores: the seven must overload the
                # server, so the priorities runs serve the degradation runs' heavier variant by default.
                pvariant = args.priority_variant or default_degrade_variant(rungs)
                for name, flags in (("without", []), ("with", ["--camera-priorities", classes])):
                    runs[name] = run_once(name, manifest, pvariant, steady, n, args.window, flags, args,
                                          Path(tmp), harnesses)
        except KeyboardInterrupt:
            print("interrupted: stopping every client and the server", file=sys.stderr)
            code = 130
        except (RuntimeError, PerceptionError, subprocess.CalledProcessError, OSError, ValueError) as exc:
            print(f"bench_lifecycle: {exc}", file=sys.stderr)
            code = 1
        finally:
            for h in harnesses:
                h.kill()
                h.server.stop()
            signal.signal(signal.SIGTERM, previous)
    if "degrade off" in runs and "degrade auto" in runs:
        report_degrade(runs["degrade off"], runs["degrade auto"], rungs)
    if "without" in runs and "with" in runs:
        report_priorities(runs["without"], runs["with"], critical=0)
    if runs:
        report_servers(list(runs.values()))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({k: run_json(r) for k, r in runs.items()}, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
