"""`make bench`: the benchmarks, one after another, each printing its side-by-side ratios; all but
bench_mot and bench_train, which take tens of minutes each (run them alone).

Benchmarks are not tests: they measure, they do not assert. Run one alone with
`python -m bench.bench_<name> --help` for its options (durations, models, sizes).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from bench import (
    bench_build,
    bench_client,
    bench_kernels,
    bench_layouts,
    bench_lifecycle,
    bench_perf_analyzer,
    bench_server,
    bench_shm,
    bench_soak,
    bench_tracking,
    bench_triton,
    bench_workers,
)

# (title, the bench's main(argv) -> exit code, its arguments)
BENCHES: tuple[tuple[str, Callable[[list[str] | None], int], list[str]], ...] = (
    ("build: INT8 / FP16 / pruned vs FP32 latency and mAP", bench_build.main, []),
    ("server: loopback vs in-process, batching throughput, reduced decode, memory", bench_server.main,
     ["--duration-s", "60"]),
    ("client: unary vs stream windows, raw vs JPEG payloads", bench_client.main, []),
    ("shm: 1080p frames as JPEG vs raw over gRPC vs shared memory, latency and CPU per frame", bench_shm.main, []),
    ("kernels: reduced JPEG decode, numpy vs OpenCV NMS, INT8 U8 vs S8 activations", bench_kernels.main, []),
    ("layouts: decode + NMS cost per frame of every output layout", bench_layouts.main, []),
    ("soak: hostile streams, 16 MiB frames", bench_soak.main, ["--duration-s", "60", "--big-duration-s", "20"]),
    ("tracking: tracker cost per frame at 10 / 50 / 100 detections", bench_tracking.main, []),
    ("triton: in-process vs Detect vs StreamDetect vs our KServe v2 vs Triton (PyTriton), tritonclient",
     bench_triton.main, []),
    ("perf_analyzer: Triton's own benchmark tool against our KServe v2 front door and Triton (PyTriton)",
     bench_perf_analyzer.main, []),
    ("workers: one worker x N threads vs N one-thread workers, the whole job and the engine alone",
     bench_workers.main, []),
    ("workers: the same, inference alone", bench_workers.main, ["--engine-only"]),
    ("lifecycle: degradation auto vs off at 10 -> 30 -> 10 fps, critical camera with vs without priorities",
     bench_lifecycle.main, ["--phase-s", "20"]),
)


def main() -> int:
    failed = 0
    for title, run, args in BENCHES:
        print(f"\n=== {title}", flush=True)
        rc = run(list(args))
        failed += int(rc != 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
