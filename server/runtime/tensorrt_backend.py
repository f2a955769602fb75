"""Native TensorRT 10 backend: a serialized engine run with ``execute_async_v3``.

TensorRT and the CUDA bindings are imported in ``activate`` only, so importing this module on
a CPU-only machine is free (the ``TYPE_CHECKING`` import below is for mypy, which checks the
TensorRT calls against the ``tensorrt-stubs`` package). The engine must have been built with an
optimisation profile for batch 1..max_batch (``tensorrt_builder``); its fingerprint is checked
before loading.

``infer`` returns every output of the engine by name, each in the engine's own dtype: an output
the server does not read still needs a device address before ``execute_async_v3``, and which
outputs matter is the caller's business, not the runtime's.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from perception.errors import ModelError
from perception.layouts import TensorInfo
from perception.manifest import read_checked
from server.runtime.fingerprint import EngineFingerprint, check_engine

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

# How long deactivate() waits for a batch in progress. Not measured: a policy, far over any
# batch of a detector this size (milliseconds), and short enough that the server's 10 s grace
# plus this wait stays under the deploy files' stop timeouts (20 s in the vehicle unit and
# compose, 30 s in Kubernetes), so a hung driver call cannot keep the server from stopping.
DEACTIVATE_WAIT_S = 5.0


class TensorRTBackend:
    """Runs one TensorRT engine on one GPU: input (B, 3, H, W) float32 -> every output by name."""

    def __init__(self, engine_path: str | Path, wanted: EngineFingerprint | None, max_batch: int = 8, device: int = 0,
                 sha256: str = ""):
        """``sha256``: the plan's hash in its manifest (a shipped engine variant). The engine is
        then deserialized from the bytes that were hashed, read once at activation, so a plan
        replaced after its manifest was checked is refused; an engine of the device's own cache
        has no manifest hash and is read as it is."""
        self.path = Path(engine_path)
        self._sha256 = sha256
        self._wanted = wanted
        self._max_batch = max_batch
        self._device = device
        self.name = "tensorrt"
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._stream: Any = None  # cuda-python's cudaStream_t
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity bytes)
        self._input = ""
        self._outputs: tuple[TensorInfo, ...] = ()
        self._out_dtypes: dict[str, np.dtype[Any]] = {}
        self._infer_lock = threading.Lock()

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def output_names(self) -> tuple[str, ...]:
        """The engine's output tensor names, in engine order (the keys of ``infer``'s result)."""
        return tuple(o.name for o in self.outputs)

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        """The engine's outputs: name, shape (None for the dynamic batch axis), numpy dtype name."""
        if self._engine is None:
            raise ModelError("backend is not activated")
        return self._outputs

    def activate(self) -> None:
        if self._engine is not None:
            return
        if self._wanted is not None:
            check_engine(self.path, self._wanted)
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise ModelError("TensorRT is not installed on this device (pip install 'perception[gpu]')") from exc
        from server.runtime.cuda import check, cudart

        rt = cudart()
        check(rt.cudaSetDevice(self._device))
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)  # the engine keeps its runtime alive (pybind11 keep_alive)
        # None on a bad or foreign plan, though the stubs promise an engine.
        plan = read_checked(self.path, self._sha256, "TensorRT engine") if self._sha256 else self.path.read_bytes()
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(plan)
        del plan  # the engine holds what it needs: the plan's bytes need not live as long
        if engine is None:
            raise ModelError(f"TensorRT could not deserialize {self.path} (built by another version or GPU?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise ModelError(f"{self.path}: expected one input and at least one output, got {inputs} / {outputs}")
        if engine.get_tensor_dtype(inputs[0]) != trt.DataType.FLOAT:
            raise ModelError(f"{self.path}: input {inputs[0]!r} must be FP32 (the build keeps FP32 IO)")
        out_dtypes = {n: _numpy_dtype(engine, n) for n in outputs}
        infos = tuple(
            TensorInfo(n, tuple(d if d >= 0 else None for d in _shape(engine.get_tensor_shape(n))), out_dtypes[n].name)
            for n in outputs
        )
        _, _, max_shape = engine.get_tensor_profile_shape(inputs[0], 0)
        self._max_batch = min(self._max_batch, int(max_shape[0]))
        self._input, self._outputs, self._out_dtypes = inputs[0], infos, out_dtypes
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = check(rt.cudaStreamCreate())
        log.info("loaded TensorRT engine %s (max batch %d, outputs %s)", self.path.name, self._max_batch, outputs)

    def _buffer(self, context: trt.IExecutionContext, name: str, nbytes: int) -> int:
        """The device buffer bound to tensor ``name``, grown (and rebound) to hold ``nbytes``."""
        from server.runtime.cuda import check, cudart

        ptr, cap = self._buffers.get(name, (0, 0))
        if cap < nbytes or not ptr:
            rt = cudart()
            if ptr:
                check(rt.cudaFree(ptr))
            size = max(nbytes, 1)  # an empty output still needs a valid address
            ptr = int(check(rt.cudaMalloc(size)))
            self._buffers[name] = (ptr, size)
            if not context.set_tensor_address(name, ptr):
                raise ModelError(f"TensorRT refused the device address of tensor {name!r}")
        return ptr

    def infer(self, batch: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
        """Run one (B, 3, H, W) batch; every output by name, each of shape (B, ...) in its engine dtype.
        One batch at a time: the execution context, its stream and buffers are not shared."""
        with self._infer_lock:
            return self._infer(batch)

    def _infer(self, batch: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
        context = self._context
        if context is None:
            raise ModelError("backend is not activated")
        from server.runtime.cuda import check, cudart

        rt = cudart()
        check(rt.cudaSetDevice(self._device))  # the current device is per thread; this is the worker's
        x = np.ascontiguousarray(batch, dtype=np.float32)
        n = x.shape[0] if x.ndim else 0
        if not 1 <= n <= self._max_batch:
            raise ModelError(f"batch of {n} is outside the engine's range 1..{self._max_batch}")
        if not context.set_input_shape(self._input, tuple(x.shape)):
            raise ModelError(f"engine rejects input shape {tuple(x.shape)}")
        outs: dict[str, NDArray[Any]] = {}
        for name in self._out_dtypes:  # every output needs an address before execute_async_v3
            shape = _shape(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ModelError(f"output {name!r} has a data-dependent shape {shape}; this backend cannot size it")
            outs[name] = np.empty(shape, dtype=self._out_dtypes[name])
        d_in = self._buffer(context, self._input, x.nbytes)
        d_outs = {name: self._buffer(context, name, out.nbytes) for name, out in outs.items()}
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, h2d, self._stream))
        if not context.execute_async_v3(int(self._stream)):  # TensorRT takes the raw handle
            raise ModelError("TensorRT execute_async_v3 failed")
        for name, out in outs.items():
            check(rt.cudaMemcpyAsync(out.ctypes.data, d_outs[name], out.nbytes, d2h, self._stream))
        check(rt.cudaStreamSynchronize(self._stream))
        return outs

    def deactivate(self) -> None:
        # Under the inference lock: a batch that looked this backend up before a recovery or a
        # swap replaced it finishes on live buffers, and the next one finds it deactivated.
        # A batch hung in the driver would hold the lock for ever, and with it a swap, a
        # recovery or the server's shutdown: after DEACTIVATE_WAIT_S the buffers are left to the
        # process's end instead (freeing them under a running kernel is worse than leaking them).
        if not self._infer_lock.acquire(timeout=DEACTIVATE_WAIT_S):
            log.error("TensorRT engine %s: a batch has run for over %.0f s; leaving its GPU memory allocated",
                      self.path, DEACTIVATE_WAIT_S)
            return
        try:
            self._release()
        finally:
            self._infer_lock.release()

    def _release(self) -> None:
        if self._engine is None:
            return
        from server.runtime.cuda import cudart

        rt = cudart()
        self._context = None  # before its engine: a context must not outlive the engine it came from
        self._engine = None
        for ptr, _ in self._buffers.values():
            rt.cudaFree(ptr)
        self._buffers.clear()
        if self._stream is not None:
            rt.cudaStreamDestroy(self._stream)
        self._stream = None


def _shape(dims: trt.Dims) -> tuple[int, ...]:
    """A ``Dims`` as a tuple of ints (-1 for a dimension not known yet)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def _numpy_dtype(engine: trt.ICudaEngine, name: str) -> np.dtype[Any]:
    """The numpy dtype of tensor ``name``; a TensorRT type numpy has no equivalent for is refused."""
    import tensorrt as trt

    dtype = engine.get_tensor_dtype(name)
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError as exc:  # nptype raises it for BF16, FP8, INT4, FP4, ...
        raise ModelError(f"output {name!r} is {dtype}, which has no numpy equivalent; export it as FP32/FP16") from exc
