"""Learning-rate schedule: linear warm-up, then cosine / linear decay or constant."""

from __future__ import annotations

import math


def lr_factor(progress: float, schedule: str, final_ratio: float) -> float:
    """Multiplier of the base lr after warm-up; ``progress`` in [0, 1] over the remaining run."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "linear":
        return 1 - (1 - final_ratio) * p
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}")


def learning_rates(
    step: int, steps_per_epoch: int, epochs: int, base_lr: float, schedule: str, final_ratio: float,
    warmup_epochs: float, warmup_bias_lr: float,
) -> tuple[float, float]:
    """(lr for weights, lr for biases) at a global optimizer step.

    During warm-up weights ramp from 0 and biases from ``warmup_bias_lr`` down to the schedule.
    """
    total = max(1, steps_per_epoch * epochs)
    warm = int(round(warmup_epochs * steps_per_epoch))
    target = base_lr * lr_factor(step / total, schedule, final_ratio)
    if step < warm:
        a = step / warm
        return target * a, warmup_bias_lr + (target - warmup_bias_lr) * a
    return target, target
