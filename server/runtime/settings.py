"""How to run a model on this machine: the settings every runtime loader takes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeSettings:
    """How to run a model here: threads, batch, and TensorRT's engine cache."""

    threads: int = 2
    max_batch: int = 8
    engine_cache_dir: str = ""
    build_engine_on_start: bool = False
    engine_precision: str = "fp16"
