"""Gate thresholds: what a variant must meet against the FP32 reference to ship.

``GateThresholds`` is the build's configuration, per variant kind (fp16, int8, pruned);
``GateThresholds.limits(name)`` turns it into the ``GateLimits`` of one named variant, which
``build_engine.gate.gate_decision`` applies to what the gate measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from perception.errors import ConfigError
from perception.manifest import Precision


@dataclass(frozen=True)
class GateLimits:
    """One variant's gate; None = that check does not apply.

    max_drop_points: largest mAP50-95 drop vs FP32, in mAP points (0..100 scale).
    max_latency_ratio: largest ratio of the variant's min batch-1 latency to FP32's.
    latency_budget_ms: largest p95 batch-1 latency, absolute, in ms.
    The FP32 reference has no relative checks (it is what the others are compared with), only
    the absolute budget.
    """

    max_drop_points: float | None
    max_latency_ratio: float | None
    latency_budget_ms: float | None = None

    def __post_init__(self) -> None:
        drop, ratio, budget = self.max_drop_points, self.max_latency_ratio, self.latency_budget_ms
        if drop is not None and not (math.isfinite(drop) and drop >= 0):
            raise ConfigError(f"a gate's mAP drop must be >= 0 points, got {drop}")
        if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
            raise ConfigError(f"a gate's latency ratio must be > 0, got {ratio}")
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise ConfigError(f"the latency budget must be > 0 ms, got {budget}")

    @property
    def is_reference(self) -> bool:
        return self.max_drop_points is None and self.max_latency_ratio is None


@dataclass(frozen=True)
class GateThresholds:
    """Per variant kind: the largest allowed mAP50-95 drop vs FP32 (points, 0..100) and the
    largest allowed ratio of min batch-1 latency to FP32's; an optional p95 budget for all.

    Latency is compared by the least-disturbed run (min): on this shared 2-core machine p50
    swings with other jobs' load, min stays within ~5 % (see ``gate.measure_latency``).
    """

    fp16: float = 0.2
    int8: float = 1.0
    pruned: float = 1.5
    # FP16 on a CPU runtime is often no faster than FP32 (demo builds here: min 1.05-1.07x fp32);
    # it ships for GPU devices, so on a CPU it must only not be much slower.
    fp16_max_latency_ratio: float = 1.5
    int8_max_latency_ratio: float = 1.0
    pruned_max_latency_ratio: float = 1.0
    latency_budget_ms: float | None = None

    def __post_init__(self) -> None:
        drops = (self.fp16, self.int8, self.pruned)
        if not all(math.isfinite(d) and d >= 0 for d in drops):
            # NaN passed a "< 0" check and failed the build only after export and quantization.
            raise ConfigError(f"gate thresholds must be finite mAP points >= 0, got {drops}")
        ratios = (self.fp16_max_latency_ratio, self.int8_max_latency_ratio, self.pruned_max_latency_ratio)
        if not all(math.isfinite(r) and r > 0 for r in ratios):
            raise ConfigError(f"gate latency ratios must be > 0, got {ratios}")
        GateLimits(None, None, self.latency_budget_ms)  # validates the budget

    def limits(self, family: str, precision: Precision | str) -> GateLimits:
        """The gate of a variant of weights ``family`` ("base", or a pruned family) at
        ``precision``; a TensorRT engine is gated like the ONNX model it is built from.

        A pruned FP16 / INT8 variant compounds both steps: mAP drops add, latency ratios multiply.
        """
        budget = self.latency_budget_ms
        precision = Precision(precision)
        step = {Precision.FP16: (self.fp16, self.fp16_max_latency_ratio),
                Precision.INT8: (self.int8, self.int8_max_latency_ratio)}.get(precision)
        if family != "base":
            if step is not None:
                return GateLimits(self.pruned + step[0], self.pruned_max_latency_ratio * step[1], budget)
            return GateLimits(self.pruned, self.pruned_max_latency_ratio, budget)
        if step is None:
            return GateLimits(None, None, budget)
        return GateLimits(step[0], step[1], budget)

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's record of the gates (``extra``)."""
        return {
            "gates_points": {"fp16": self.fp16, "int8": self.int8, "pruned": self.pruned},
            "gates_latency": {"fp16_max_ratio": self.fp16_max_latency_ratio,
                              "int8_max_ratio": self.int8_max_latency_ratio,
                              "pruned_max_ratio": self.pruned_max_latency_ratio,
                              "budget_p95_ms": self.latency_budget_ms},
        }
