"""GPU utilisation and memory via NVML, where an NVIDIA GPU and pynvml exist.

``pynvml`` (package ``nvidia-ml-py``) is imported lazily, so a CPU-only install imports this
module cleanly and exports no GPU series at all (rather than zeros that would look like an idle
GPU). Names mirror Triton's ``nv_gpu_*`` metrics; see docs/metrics.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


class GpuCollector(Collector):
    """Per-GPU utilisation, memory and power, read from NVML at scrape time."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        count = nvml.nvmlDeviceGetCount()
        self._devices = []
        for i in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            self._devices.append((str(i), uuid.decode() if isinstance(uuid, bytes) else str(uuid), handle))

    def collect(self) -> Iterator[Metric]:
        nvml = self._nvml
        labels = ["gpu", "uuid"]
        util = GaugeMetricFamily("perception_gpu_utilization_ratio", "GPU utilisation (0..1).", labels=labels)
        used = GaugeMetricFamily("perception_gpu_memory_used_bytes", "GPU memory in use.", labels=labels)
        total = GaugeMetricFamily("perception_gpu_memory_total_bytes", "GPU memory.", labels=labels)
        power = GaugeMetricFamily("perception_gpu_power_watts", "GPU power draw.", labels=labels)
        for index, uuid, handle in self._devices:
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                util.add_metric([index, uuid], rates.gpu / 100.0)
                used.add_metric([index, uuid], float(mem.used))
                total.add_metric([index, uuid], float(mem.total))
                power.add_metric([index, uuid], nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
            except nvml.NVMLError as exc:  # a GPU that fell off the bus must not break the scrape
                logger.warning("NVML read of GPU %s failed: %s", index, exc)
        yield from (util, used, total, power)


def register_gpu_collector(registry: CollectorRegistry) -> bool:
    """Register GPU metrics if NVML is usable; returns whether it was (False on CPU-only hosts)."""
    try:
        import pynvml  # optional: nvidia-ml-py
    except ImportError:
        logger.debug("pynvml is not installed: no GPU metrics")
        return False
    try:
        pynvml.nvmlInit()
        collector = GpuCollector(pynvml)
    except pynvml.NVMLError as exc:
        logger.info("NVML is not usable (%s): no GPU metrics", exc)
        return False
    if not collector._devices:
        return False
    registry.register(collector)
    logger.info("exporting metrics of %d GPU(s)", len(collector._devices))
    return True
