"""How to spend the cores on inference: one worker with N intra-op threads, or N workers with
one thread each running batches side by side.

The whole per-frame job runs, as the server runs it: decode + letterbox (the pipeline's
``prepare``), inference of a batch, NMS (``finish``), on the shipped model's default variant and
the bundled drive's frames as 1280x720 JPEGs. Each arrangement runs for ``--seconds``; the
arrangements alternate over ``--rounds`` rounds, and the table gives each one's median frames/s.

- ``1 worker x N threads``: one onnxruntime session with N intra-op threads, batches one after
  another (what the server did before it chose from the core count);
- ``N workers x 1 thread``: N sessions of one thread each, every worker taking its own batches
  (decode included) in its own Python thread (the server's choice on a CPU: one run per core).

Each arrangement runs at every ``--batch`` given (frames per inference run; the server's
``--inference-batch``, 1 by default on a CPU), with onnxruntime's memory arena off as the
server runs it.

Not a test: nothing is asserted.

    .venv/bin/python -m bench.bench_workers [--model M.json] [--batch 1 4] [--seconds 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run(manifest: Any, frames: list[bytes], workers: int, threads: int, batch: int, seconds: float,
        engine_only: bool = False) -> float:
    """Frames per second of the whole job (or, ``engine_only``, of inference on tensors
    prepared beforehand) with ``workers`` sessions of ``threads`` threads."""
    from perception.pipeline import FrameInput, FramePipeline, RequestOptions
    from server.runtime.factory import RuntimeSettings, backend_for

    done = [0] * workers
    stop = threading.Event()
    setups = []
    for _ in range(workers):
        pipe = FramePipeline.from_manifest(manifest)
        backend, _ = backend_for(manifest, "", RuntimeSettings(threads=threads, max_batch=batch))
        pipe.bind_outputs(backend.outputs)
        pipe.run_batch([FrameInput("w", 0, 0, encoded=frames[0])] * batch, RequestOptions(), backend.infer)  # warm
        setups.append((pipe, backend))

    def work(k: int) -> None:
        pipe, backend = setups[k]
        if engine_only:
            prepared = [pipe.prepare(FrameInput("w", j, 0, encoded=frames[j % len(frames)]), RequestOptions())
                        for j in range(batch)]
            tensor = pipe.to_batch([pr.tensor for pr in prepared])
            while not stop.is_set():
                backend.infer(tensor)
                done[k] += batch
            return
        i = k
        while not stop.is_set():
            chunk = [FrameInput("w", i + j, 0, encoded=frames[(i + j) % len(frames)]) for j in range(batch)]
            pipe.run_batch(chunk, RequestOptions(), backend.infer)
            done[k] += batch
            i += batch

    pool = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    for _, backend in setups:
        backend.deactivate()
    return sum(done) / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_workers", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", type=Path, help="manifest.json (default: the shipped default model)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="frames per batch (default: 1 and 4)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each measurement (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--engine-only", action="store_true",
                   help="time inference alone, on tensors prepared once (the server decodes on other threads)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from bench.bench_server import shipped_model
    from bench.bench_triton import bench_frames
    from perception.manifest import load_manifest

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        manifest = load_manifest(args.model or shipped_model(Path(tmp)))
        frames = bench_frames(Path(tmp) / "frames")
        arrangements = {f"1 worker x {cores} threads": (1, cores), f"{cores} workers x 1 thread": (cores, 1)}
        if cores > 1:
            arrangements["1 worker x 1 thread"] = (1, 1)
        fps: dict[tuple[str, int], list[float]] = {(k, b): [] for b in args.batch for k in arrangements}
        for _ in range(args.rounds):
            for (name, batch) in fps:
                workers, threads = arrangements[name]
                fps[(name, batch)].append(run(manifest, frames, workers, threads, batch, args.seconds,
                                              args.engine_only))
    best = max(statistics.median(v) for v in fps.values())
    what = "inference alone (tensors prepared once)" if args.engine_only else "decode + inference + NMS"
    print(f"{what}, 1280x720 JPEGs, model {manifest.name} "
          f"({manifest.variant().name}), {cores} cores, {args.rounds} rounds of {args.seconds:g} s")
    print()
    print("| arrangement | frames per run | frames/s (median) | per round | x best |")
    print("|---|---|---|---|---|")
    for (name, batch), v in fps.items():
        med = statistics.median(v)
        print(f"| {name} | {batch} | {med:.1f} | {' / '.join(f'{x:.1f}' for x in v)} | {med / best:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
