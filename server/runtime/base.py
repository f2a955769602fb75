"""The one interface every inference runtime implements (onnxruntime, TensorRT, ...).

Life cycle in the Polygraphy style: construct (cheap, no side effects) -> ``activate()``
(load, allocate, warm up) -> ``infer()`` any number of times -> ``deactivate()``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray


@runtime_checkable
class Backend(Protocol):
    """A loaded model that maps a float32 (B, 3, H, W) batch to its raw output (B, N, 5 + C)."""

    name: str  # e.g. "onnxruntime-cpu", "tensorrt"

    @property
    def max_batch(self) -> int:
        """Largest batch ``infer`` accepts."""
        ...

    def activate(self) -> None:
        """Load the engine and allocate; idempotent."""
        ...

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """Run one batch. Raises perception.errors.ModelError on runtime failure."""
        ...

    def deactivate(self) -> None:
        """Free the engine; idempotent."""
        ...
