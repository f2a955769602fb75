"""How to run a model on this machine: the settings every runtime loader takes, and how the
cores are spent on inference."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RuntimeSettings:
    """How to run a model here: threads, batch, and TensorRT's engine cache."""

    threads: int = 2
    max_batch: int = 8
    engine_cache_dir: str = ""
    build_engine_on_start: bool = False
    engine_precision: str = "fp16"


def usable_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may use: its CPU affinity (e.g. a container's cpuset), and no more
    than its cgroup's CPU quota rounded up (a Kubernetes CPU limit of 2 on a 16-core node)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        cores = max(1, os.cpu_count() or 1)
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]  # "max 100000" when unlimited
        if quota != "max" and int(period) > 0:
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):  # cgroup v1, or no cgroup file: the affinity alone
        pass
    return cores


def resolve_arrangement(threads: int, workers: int, cores: int, on_cpu: bool = True) -> tuple[int, int]:
    """(intra-op threads per batch, batches run at once); 0 = choose.

    On a GPU (``on_cpu`` false) one batch runs at a time, and the threads (for the operators
    left on the CPU) are the cores.

    Nothing set: one thread per batch and one batch per core. On the 2-core machines this was
    measured on, the whole job (decode, inference, NMS) of the shipped model ran more
    frames/s with two one-thread workers than with one two-thread worker (1.6-1.9x)
    (``bench/bench_workers.py``, docs/performance.md): one thread per run has no intra-op
    hand-offs, and two runs keep both cores busy where one leaves gaps between its parallel
    sections. One of them set: the other fills the cores.
    """
    if not on_cpu:
        return threads or cores, workers or 1
    if threads and workers:
        return threads, workers
    if threads:
        return threads, max(1, cores // threads)
    if workers:
        return max(1, cores // workers), workers
    return 1, cores
