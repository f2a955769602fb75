"""How to run a model on this machine: the settings every runtime loader takes, and how the
cores are spent on inference."""

from __future__ import annotations

import math
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


def usable_cores(cgroup_root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> int:
    """The cores this process may use: its CPU affinity (e.g. a container's cpuset), and no more
    than its cgroup's CPU quota rounded up (a Kubernetes CPU limit of 2 on a 16-core node, a
    systemd unit's ``CPUQuota=150%``).

    ``cgroup_root`` is the cgroup v2 mount and ``self_cgroup`` this process's membership file
    (parameters so tests can hand in a fake tree)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        cores = max(1, os.cpu_count() or 1)
    limit = cgroup_cpu_limit(cgroup_root, self_cgroup)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return cores


def cgroup_cpu_limit(cgroup_root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The CPUs' worth of time this process's cgroup v2 may use (quota / period), None = no limit.

    The quota that binds is the lowest on the way from the process's own cgroup to the root:
    a systemd service's ``CPUQuota=`` is in its own cgroup (``/system.slice/NAME.service``,
    read from ``self_cgroup``'s ``0::PATH`` line), a slice's above it, and a container with its
    own cgroup namespace sees its limit at the root of its mount (``0::/``). cgroup v1 (no
    ``0::`` line, no ``cpu.max``): None, the affinity alone.
    """
    root = Path(cgroup_root)
    own = ""
    try:
        for line in Path(self_cgroup).read_text().splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hierarchy == "0" and controllers == "":
                own = path.strip()
                break
    except OSError:
        pass
    parts = [p for p in own.split("/") if p and p not in (".", "..")]
    lowest: float | None = None
    for depth in range(len(parts), -1, -1):  # the leaf first, the root last
        try:
            quota, period = (root.joinpath(*parts[:depth]) / "cpu.max").read_text().split()[:2]
            if quota == "max" or int(period) <= 0:  # "max 100000": no limit at this level
                continue
            cpus = int(quota) / int(period)
        except (OSError, ValueError):  # no cpu.max here (the host's root, a cgroup v1 tree)
            continue
        lowest = cpus if lowest is None else min(lowest, cpus)
    return lowest


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
