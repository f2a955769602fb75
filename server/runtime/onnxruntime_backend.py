"""ONNX Runtime backend (CPU by default; CUDA / TensorRT execution providers where installed).

``PROVIDERS`` maps the server's backend names to execution-provider preference lists; the
factory only picks a name whose first provider the installed onnxruntime build offers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from perception.errors import ModelError
from perception.layouts import TensorInfo
from perception.manifest import read_checked

log = logging.getLogger(__name__)

# StringStringEntryProto field 1 (tag 0x0a), 8 bytes, "location": TensorProto.external_data's key.
_EXTERNAL_DATA_KEY = b"\x0a\x08location"

PROVIDERS: dict[str, tuple[str, ...]] = {
    "onnxruntime-tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "onnxruntime-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "onnxruntime-cpu": ("CPUExecutionProvider",),
}


def available_providers() -> set[str]:
    """Execution providers of the installed onnxruntime build (empty if it is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return set()
    return set(ort.get_available_providers())


# onnxruntime's tensor type strings -> numpy dtype names.
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(bool)": "bool"}


def concat_ragged(arrays: list[NDArray[Any]]) -> NDArray[Any]:
    """Concatenate per-chunk outputs along the batch axis, zero-padding the other axes to the
    largest chunk: a post-NMS model's (1, K, 4) boxes have a different K for every image (its
    ``num_dets`` says how many rows are real; padded rows score 0)."""
    if all(a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        return np.concatenate(arrays)
    shape = np.max([a.shape for a in arrays], axis=0)
    out = np.zeros((sum(a.shape[0] for a in arrays), *shape[1:]), arrays[0].dtype)
    row = 0
    for a in arrays:
        out[(slice(row, row + a.shape[0]),) + tuple(slice(0, d) for d in a.shape[1:])] = a
        row += a.shape[0]
    return out


class OnnxRuntimeBackend:
    """Runs an ONNX file with onnxruntime; ``infer`` returns every output by name.

    providers: execution providers in preference order; those not available in the installed
    onnxruntime build are skipped (CPU is always last resort).
    memory_arena: keep onnxruntime's CPU memory arena (faster allocation, but it never shrinks).
    sha256: the file's hash in its manifest. The session is then made from the bytes that were
    hashed, read once at each activation, so a file replaced after its manifest was checked is
    refused (ManifestError) instead of served; without it (a file the build stage has just
    written, which has no manifest yet) onnxruntime opens the path.
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int = 0,
        max_batch: int = 8,
        memory_arena: bool = False,
        sha256: str = "",
    ) -> None:
        self.path = Path(path)
        self._sha256 = sha256
        self._providers = tuple(providers)
        self._threads = intra_op_threads
        self._max_batch = max_batch
        self._memory_arena = memory_arena
        self._session: Any = None
        self._input_name = ""
        self._outputs: tuple[TensorInfo, ...] = ()
        self._static_batch = 0  # > 0 when the model's batch dimension is fixed
        self._single_image = False  # the model takes one (3, H, W) image and has no batch axis
        self.name = "onnxruntime"

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self._outputs

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
        # Idle pool threads must not spin: decode and NMS run beside inference on few cores.
        # Measured on the 2-core build machine, decode+infer+NMS of one 1080p frame in one
        # process: 22.9 ms with spinning, 15.0 ms without.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # onnxruntime's CPU arena keeps the peak of every batch size ever run: +127 MB RSS
        # after one batch-8 run of the 640x384 "small" detector, +60 MB without it (measured
        # here); inference time did not measurably change.
        opts.enable_cpu_mem_arena = self._memory_arena
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        model: str | bytes = str(self.path)
        if self._sha256:
            data = read_checked(self.path, self._sha256, "onnxruntime model")
            # A model with external weights is opened by path: given as bytes it has no
            # directory to find them in, which only newer onnxruntimes can be told. Its weights
            # are outside the manifest's hash anyway (`perception build` and `import` write
            # none). Its tensors carry the entry key "location": protobuf's bytes of that key,
            # which a tensor or node name of the same 8 letters could also hold (opened by path
            # then, as before this check; never refused).
            if _EXTERNAL_DATA_KEY not in data:
                # (onnxruntime's Python session keeps these bytes, to remake itself on a fallback
                # provider: one copy of the model file, a few MB, while it serves.)
                model = data
            del data
        try:
            self._session = ort.InferenceSession(model, sess_options=opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        self._outputs = tuple(
            TensorInfo(o.name, tuple(d if isinstance(d, int) else None for d in (o.shape or ())),
                       _ORT_TYPES.get(o.type, o.type))
            for o in self._session.get_outputs()
        )
        first = self._session.get_inputs()[0]
        self._input_name = first.name
        batch_dim = first.shape[0] if first.shape else None
        if first.shape is not None and len(first.shape) == 3:
            # A single-image export (torchvision-style two-stage models): one image per run;
            # its outputs are given a batch axis so that every layout sees (B, ...).
            self._single_image = True
            self._max_batch = 1
            self._outputs = tuple(TensorInfo(o.name, (1, *o.shape), o.dtype) for o in self._outputs)
        elif isinstance(batch_dim, int) and batch_dim > 0:
            # A fixed-batch export: serve up to that batch, padding smaller ones.
            self._static_batch = batch_dim
            self._max_batch = batch_dim
        self.name = "onnxruntime-" + chosen[0].replace("ExecutionProvider", "").lower()
        log.info("loaded %s with %s", self.path.name, chosen)

    def infer(self, batch: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
        # One session for the whole batch, taken once: a deactivate() meanwhile (a health
        # recovery replacing this backend) lets a run of several chunks or frames end on the
        # session it began on, freed when the run lets it go; it used to fail mid-run.
        session = self._session
        if session is None:
            raise ModelError("backend is not activated")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if self._single_image:
            # One run per frame. The server never batches past max_batch 1, but the gate, INT8
            # scoring and `perception eval` hand their batches to any model; each frame's outputs
            # get the batch axis and are joined like a fixed-batch model's chunks (a two-stage
            # export's K differs per frame).
            if x.shape[0] == 1:
                return {name: out[None] for name, out in self._run(session, x[0]).items()}
            if x.shape[0] == 0:
                raise ModelError("a single-image model got an empty batch")
            frames = [self._run(session, frame) for frame in x]
            return {name: concat_ragged([f[name][None] for f in frames]) for name in frames[0]}
        if not self._static_batch:
            return self._run(session, x)
        # A fixed-batch export runs in chunks of exactly its batch, the last one zero-padded.
        k, n = self._static_batch, x.shape[0]
        parts: list[dict[str, NDArray[Any]]] = []
        for i in range(0, n, k):
            chunk = x[i : i + k]
            if chunk.shape[0] < k:
                chunk = np.concatenate([chunk, np.zeros((k - chunk.shape[0], *x.shape[1:]), np.float32)])
            parts.append({name: out[: min(k, n - i)] for name, out in self._run(session, chunk).items()})
        return {name: concat_ragged([p[name] for p in parts]) for name in parts[0]}

    def _run(self, session: Any, x: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
        try:
            values = session.run(None, {self._input_name: x})
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"onnxruntime inference failed: {exc}") from exc
        return {info.name: np.asarray(v) for info, v in zip(self._outputs, values, strict=True)}

    def deactivate(self) -> None:
        self._session = None
