"""Process and host CPU / memory metrics, for the metrics registry of the server.

prometheus_client's own collectors give the standard ``process_*`` (CPU seconds, resident
memory, open fds, start time; read from /proc, Linux only) and ``python_info`` series every
Prometheus user knows; psutil adds what they lack and Triton exports as ``nv_cpu_*``: host
CPU utilisation and memory, and the process's thread count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


class HostCollector(Collector):
    """Host CPU utilisation and memory, and this process's threads, read at scrape time.

    CPU utilisation is averaged over the interval since the previous scrape (the first scrape
    reports the average since the collector was created).
    """

    def __init__(self) -> None:
        import psutil  # lazy: only the server needs it

        self._psutil = psutil
        self._process = psutil.Process()
        # Own baseline rather than psutil.cpu_percent(None), whose one global baseline another
        # caller (or a second registry in tests) would reset under us.
        self._last_cpu = psutil.cpu_times()

    def collect(self) -> Iterator[Metric]:
        ps = self._psutil
        cpu = GaugeMetricFamily(
            "perception_host_cpu_utilization_ratio",
            "Host CPU utilisation (0..1, all cores) since the previous scrape.",
        )
        cpu.add_metric([], self._cpu_utilization())
        yield cpu
        cores = GaugeMetricFamily("perception_host_cpu_cores", "Logical CPU cores of the host.")
        cores.add_metric([], float(ps.cpu_count() or 0))
        yield cores
        vm = ps.virtual_memory()
        total = GaugeMetricFamily("perception_host_memory_total_bytes", "Host physical memory.")
        total.add_metric([], float(vm.total))
        yield total
        used = GaugeMetricFamily(
            "perception_host_memory_used_bytes", "Host physical memory in use (total - available)."
        )
        used.add_metric([], float(vm.total - vm.available))
        yield used
        threads = GaugeMetricFamily("perception_process_threads", "Threads of the server process.")
        try:
            threads.add_metric([], float(self._process.num_threads()))
        except ps.Error as exc:  # the process is ours, so only a platform quirk gets here
            logger.debug("cannot read the thread count: %s", exc)
            return
        yield threads


    def _cpu_utilization(self) -> float:
        now = self._psutil.cpu_times()
        last, self._last_cpu = self._last_cpu, now
        total = sum(now) - sum(last)
        if total <= 0:
            return 0.0
        return min(1.0, max(0.0, (_busy(now) - _busy(last)) / total))


def _busy(times: Any) -> float:
    """CPU seconds not idle (iowait counts as idle, as in top / Triton's nv_cpu_utilization)."""
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def register_process_collectors(registry: CollectorRegistry) -> None:
    """Register the standard process / platform collectors and the psutil host collector."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    try:
        registry.register(HostCollector())
    except ImportError:
        logger.info("psutil is not installed: host CPU and memory metrics are not exported")
