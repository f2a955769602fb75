"""ONNX Runtime backend (CPU by default; CUDA / TensorRT execution providers where installed)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.typing import NDArray

from perception.errors import ModelError

log = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    """Runs an ONNX file with onnxruntime.

    providers: execution providers in preference order; those not available in the installed
    onnxruntime build are skipped (CPU is always last resort).
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int = 0,
        max_batch: int = 8,
    ) -> None:
        self.path = Path(path)
        self._providers = tuple(providers)
        self._threads = intra_op_threads
        self._max_batch = max_batch
        self._session = None
        self._input_name = ""
        self.name = "onnxruntime"

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def activate(self) -> None:
        if self._session is not None:
            return
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - an install problem, not a code path
            raise ModelError("onnxruntime is not installed (pip install 'perception[server]')") from exc
        available = set(ort.get_available_providers())
        chosen = [p for p in self._providers if p in available] or ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._threads > 0:
            opts.intra_op_num_threads = self._threads
            opts.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        self._input_name = self._session.get_inputs()[0].name
        self.name = "onnxruntime-" + chosen[0].replace("ExecutionProvider", "").lower()
        log.info("loaded %s with %s", self.path.name, chosen)

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        if self._session is None:
            raise ModelError("backend is not activated")
        try:
            (out,) = self._session.run(None, {self._input_name: np.ascontiguousarray(batch, dtype=np.float32)})[:1]
        except Exception as exc:
            raise ModelError(f"onnxruntime inference failed: {exc}") from exc
        return np.asarray(out, dtype=np.float32)

    def deactivate(self) -> None:
        self._session = None
