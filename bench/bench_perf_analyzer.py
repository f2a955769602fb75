"""Triton's own benchmark tool, stock perf_analyzer, against our KServe v2 front door and Triton.

perf_analyzer is what a Triton user measures a server with. This runs the binary NVIDIA ships in
the ``tritonclient==2.41.0`` wheel (the last wheels to carry it; later ones do not) against
``perception serve --kserve`` and, where ``bench/bench_triton.py``'s peer venv can run it, Triton
serving the same pipeline through PyTriton, alternating the two for ``--rounds`` rounds, with the
bundled drive's frames as 1280x720 JPEGs (its ``--input-data``), at each ``--concurrency``, over
ModelInfer (and ModelStreamInfer with ``--streaming``). It prints perf_analyzer's own figures:
throughput and client-side p50 / p99.

What perf_analyzer needs beyond the wheel, fetched from the package registry into
``~/.cache/perception/perf-analyzer`` on first use: ``libcudart.so.12`` (the binary links it even
to measure a CPU server; the ``nvidia-cuda-runtime-cu12`` wheel has it) and ``libb64.so.0d``, a
system library (Debian: ``apt-get install libb64-0d``); without it the run stops and says so.

    .venv/bin/python -m bench.bench_perf_analyzer [--rounds 3] [--concurrency 1,4] [--streaming]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from bench.bench_triton import DEFAULT_PEER, SHIPPED_MODEL, TritonPeer, bench_frames, make_peer, stop_process

WHEEL = "tritonclient==2.41.0"  # the newest tritonclient wheel that ships bin/perf_analyzer
CUDART = "nvidia-cuda-runtime-cu12==12.9.79"
# Named after the pins: a change of either fetches them again.
CACHE = Path.home() / ".cache" / "perception" / f"perf-analyzer-{WHEEL.split('==')[1]}-cudart-{CUDART.split('==')[1]}"


def _extract(spec: str, suffix: str, dest: Path) -> None:
    """``dest``: the wheel member ending in ``suffix`` of package ``spec``, fetched with pip (the
    wheel is not kept). Written beside and renamed, so a run beside this one never sees half."""
    with tempfile.TemporaryDirectory(prefix="perf_analyzer_") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64", "-d", tmp, spec],
                       check=True, timeout=600, capture_output=True)
        wheel = next(Path(tmp).glob("*.whl"), None)
        if wheel is None:
            raise RuntimeError(f"pip download {spec} left no wheel")
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(suffix)), None)
            if member is None:
                raise RuntimeError(f"{wheel.name} has no {suffix}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(dest.name + f".{os.getpid()}.part")
            part.write_bytes(z.read(member))
            part.chmod(0o755)
            part.replace(dest)


def perf_analyzer() -> tuple[Path, dict[str, str]]:
    """(the binary, the environment it runs in); RuntimeError with what is missing."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise RuntimeError(f"the wheel's perf_analyzer is built for Linux x86_64, not {platform.system()} "
                           f"{platform.machine()} (on a Jetson, use the one in NVIDIA's Triton client image)")
    binary = CACHE / "perf_analyzer"
    libdir = CACHE / "lib"
    try:
        if not binary.exists():
            _extract(WHEEL, "/bin/perf_analyzer", binary)
        if not (libdir / "libcudart.so.12").exists():
            _extract(CUDART, "/libcudart.so.12", libdir / "libcudart.so.12")
    except (subprocess.SubprocessError, OSError) as exc:
        raise RuntimeError(f"fetching perf_analyzer ({WHEEL}, {CUDART}) failed: {exc}") from exc
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
        p for p in (str(libdir), os.environ.get("LD_LIBRARY_PATH", "")) if p))
    try:
        linked = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"cannot check what perf_analyzer links (ldd): {exc}") from exc
    missing = [line.split("=>")[0].strip() for line in linked.splitlines() if "not found" in line]
    if missing:
        hint = " (Debian: apt-get install libb64-0d)" if any("libb64" in m for m in missing) else ""
        raise RuntimeError(f"perf_analyzer cannot load {', '.join(missing)}{hint}")
    return binary, env


def input_data(frames: list[bytes], path: Path) -> Path:
    """perf_analyzer's --input-data: one entry per frame, cycled through. A BYTES tensor's "b64" is
    its raw contents, each element a 4-byte little-endian length and then its bytes."""
    entries = [{"IMAGE": {"b64": base64.b64encode(struct.pack("<I", len(f)) + f).decode(), "shape": [1]}}
               for f in frames]
    path.write_text(json.dumps({"data": entries}))
    return path


def run_once(binary: Path, env: dict[str, str], address: str, model: str, data: Path, concurrency: int,
             interval_ms: int, streaming: bool, out: Path) -> dict[str, float]:
    """One perf_analyzer measurement: its CSV row (throughput, latencies in ms)."""
    cmd = [str(binary), "-m", model, "-i", "grpc", "-u", address, "--input-data", str(data),
           "--concurrency-range", str(concurrency), "--measurement-interval", str(interval_ms), "-f", str(out),
           # Three windows in a row within 15 % (its default: 10 %, in 10 tries), which this shared
           # 2-core machine often missed for Triton at concurrency 4.
           "--stability-percentage", "15", "--max-trials", "20",
           *(["--streaming"] if streaming else [])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"perf_analyzer did not run against {address}: {exc}") from exc
    if done.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed against {address}: {(done.stdout + done.stderr)[-1500:]}")
    try:
        with out.open() as f:
            row = next(csv.DictReader(f))
        return {"fps": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
                "p99_ms": float(row["p99 latency"]) / 1000}
    except (OSError, StopIteration, KeyError, ValueError) as exc:
        raise RuntimeError(f"perf_analyzer's report {out} is not what this bench reads: {exc!r}") from exc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_perf_analyzer", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="manifest.json (default: the shipped model)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--concurrency", default="1,4", help="perf_analyzer concurrencies, comma-separated (default 1,4)")
    p.add_argument("--interval-ms", type=int, default=3000, help="perf_analyzer's measurement window (default 3000)")
    p.add_argument("--streaming", action="store_true", help="ModelStreamInfer instead of ModelInfer")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads on both sides (default 1)")
    p.add_argument("--instances", type=int, default=0,
                   help="Triton's model instances (default: as many as our server's inference workers here)")
    p.add_argument("--no-triton", action="store_true", help="measure our front door only")
    p.add_argument("--peer-venv", type=Path, default=DEFAULT_PEER, help="bench_triton's Triton peer venv")
    p.add_argument("--json-out", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)
    if not args.model.is_file():
        raise SystemExit(f"{args.model}: no such manifest (run `make demo` to build the shipped model)")
    try:
        binary, env = perf_analyzer()
    except RuntimeError as exc:
        print(f"[bench_perf_analyzer] skipped, perf_analyzer cannot run here: {exc}", file=sys.stderr)
        return 0  # a measurement not made, not a failed one (`make bench` goes on)
    from bench.bench_client import start_server
    from perception.manifest import load_manifest

    model = load_manifest(args.model).name
    if not args.instances:  # one per run our server makes at once here: the same arrangement on both sides
        from server.runtime.settings import resolve_arrangement, usable_cores

        args.instances = resolve_arrangement(args.threads, 0, usable_cores())[1]
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="bench_perf_analyzer_"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        data = input_data(bench_frames(tmp / "frames"), tmp / "input.json")
        proc, ours = start_server(args.model, "--kserve", "--threads", str(args.threads))
        stack.callback(stop_process, proc)
        servers = {"KServe v2 (ours)": ours}
        if not args.no_triton:
            python, can_triton, why_not = make_peer(args.peer_venv)
            if can_triton:
                try:
                    peer = TritonPeer(python, args.model, args.threads, instances=args.instances)
                    stack.callback(peer.stop)
                    servers["Triton (PyTriton)"] = peer.address
                except RuntimeError as exc:
                    why_not = str(exc)
            if why_not:
                print(f"[bench_perf_analyzer] no Triton row: {why_not}", file=sys.stderr)
        results: dict[str, dict[int, list[dict[str, float]]]] = {s: {c: [] for c in concurrencies} for s in servers}
        failed = 0
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for c in concurrencies:
                for name in order:
                    try:
                        got = run_once(binary, env, servers[name], model, data, c, args.interval_ms,
                                       args.streaming, tmp / "out.csv")
                    except RuntimeError as exc:  # one measurement lost (unstable, say), not the rest
                        failed += 1
                        print(f"[bench_perf_analyzer] round {r + 1} concurrency {c} {name}: no figure: {exc}",
                              file=sys.stderr, flush=True)
                        continue
                    results[name][c].append(got)
                    print(f"[bench_perf_analyzer] round {r + 1} concurrency {c} {name}: {got['fps']:.1f} fps, "
                          f"p50 {got['p50_ms']:.2f} ms, p99 {got['p99_ms']:.2f} ms", file=sys.stderr, flush=True)
    print(report(results, args.streaming, args.instances))
    if args.json_out:
        args.json_out.write_text(json.dumps({"streaming": args.streaming, "results": {
            name: {str(c): runs for c, runs in by_c.items()} for name, by_c in results.items()}}, indent=2))
    if failed:
        print(f"[bench_perf_analyzer] {failed} measurement(s) failed; the table has the rest", file=sys.stderr)
    return 1 if failed else 0


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def report(results: dict[str, dict[int, list[dict[str, Any]]]], streaming: bool, instances: int) -> str:
    """A markdown table: per server and concurrency, the medians over the rounds (and the range)."""
    method = "ModelStreamInfer" if streaming else "ModelInfer"
    lines = [f"perf_analyzer ({WHEEL}), {method}; medians over the rounds (range); Triton's instances: {instances}",
             "",
             "| server | concurrency | infer/s | p50 ms | p99 ms | p50 x Triton's |", "|---|---|---|---|---|---|"]
    triton = results.get("Triton (PyTriton)", {})
    for name, by_c in results.items():
        for c, runs in by_c.items():
            if not runs:
                continue
            cols = []
            for key, fmt in (("fps", "{:.1f}"), ("p50_ms", "{:.2f}"), ("p99_ms", "{:.2f}")):
                vals = [run[key] for run in runs]
                cols.append(f"{fmt.format(_median(vals))} ({fmt.format(min(vals))}-{fmt.format(max(vals))})")
            theirs = triton.get(c)
            ratio = (f"{_median([run['p50_ms'] for run in runs]) / _median([t['p50_ms'] for t in theirs]):.2f}x"
                     if theirs else "-")
            lines.append(f"| {name} | {c} | {' | '.join(cols)} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
