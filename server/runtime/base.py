"""The one interface every inference runtime implements (onnxruntime, TensorRT, ...).

Life cycle in the Polygraphy style: a loader makes the runner (cheap, no side effects) ->
``activate()`` (load, allocate) -> ``infer()`` any number of times -> ``deactivate()``.
``infer`` returns every model output by name; which output plays which role is the output
layout's business (``perception.layouts``), not the runtime's.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from perception.layouts import TensorInfo


@runtime_checkable
class Backend(Protocol):
    """A loaded model: float32 (B, 3, H, W) batch in, every output (B, ...) by name out."""

    name: str  # e.g. "onnxruntime-cpu", "tensorrt"

    @property
    def max_batch(self) -> int:
        """Largest batch ``infer`` accepts."""
        ...

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        """The model's outputs (name, shape with None for dynamic axes, dtype); after activate()."""
        ...

    def activate(self) -> None:
        """Load the engine and allocate; idempotent."""
        ...

    def infer(self, batch: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
        """Run one batch; every output by name. Raises perception.errors.ModelError on failure."""
        ...

    def deactivate(self) -> None:
        """Free the engine; idempotent."""
        ...
