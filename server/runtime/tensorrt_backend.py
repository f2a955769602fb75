"""Native TensorRT 10 backend: a serialized engine run with ``execute_async_v3``.

TensorRT and the CUDA bindings are imported in ``activate`` only, so importing this module on
a CPU-only machine is free. The engine must have been built with an optimisation profile for
batch 1..max_batch (``tensorrt_builder``); its fingerprint is checked before loading.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from perception.errors import ModelError
from server.runtime.fingerprint import EngineFingerprint, check_engine

log = logging.getLogger(__name__)


class TensorRTBackend:
    """Runs one TensorRT engine on one GPU. Input (B, 3, H, W) float32 -> output (B, N, 5 + C)."""

    def __init__(self, engine_path: str | Path, wanted: EngineFingerprint | None, max_batch: int = 8, device: int = 0):
        self.path = Path(engine_path)
        self._wanted = wanted
        self._max_batch = max_batch
        self._device = device
        self.name = "tensorrt"
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity bytes)
        self._input = ""
        self._output = ""
        self._outputs: list[str] = []
        self._out_dtype: Any = np.float32

    @property
    def max_batch(self) -> int:
        return self._max_batch

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
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise ModelError(f"TensorRT could not deserialize {self.path} (built by another version or GPU?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise ModelError(f"{self.path}: expected one input and at least one output, got {inputs} / {outputs}")
        if engine.get_tensor_dtype(inputs[0]) != trt.DataType.FLOAT:
            raise ModelError(f"{self.path}: input {inputs[0]!r} must be FP32 (the build keeps FP32 IO)")
        self._input, self._output = inputs[0], outputs[0]
        self._outputs = outputs  # every output needs an address before execute_async_v3
        _, _, max_shape = engine.get_tensor_profile_shape(self._input, 0)
        self._max_batch = min(self._max_batch, int(max_shape[0]))
        self._out_dtype = trt.nptype(engine.get_tensor_dtype(self._output))
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = check(rt.cudaStreamCreate())
        log.info("loaded TensorRT engine %s (max batch %d)", self.path.name, self._max_batch)

    def _buffer(self, name: str, nbytes: int) -> int:
        from server.runtime.cuda import check, cudart

        ptr, cap = self._buffers.get(name, (0, 0))
        if cap < nbytes:
            rt = cudart()
            if ptr:
                check(rt.cudaFree(ptr))
            ptr = int(check(rt.cudaMalloc(nbytes)))
            self._buffers[name] = (ptr, nbytes)
            self._context.set_tensor_address(name, ptr)
        return ptr

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        if self._context is None:
            raise ModelError("backend is not activated")
        from server.runtime.cuda import check, cudart

        rt = cudart()
        check(rt.cudaSetDevice(self._device))  # the current device is per thread; this is the worker's
        x = np.ascontiguousarray(batch, dtype=np.float32)
        n = x.shape[0]
        if not 1 <= n <= self._max_batch:
            raise ModelError(f"batch of {n} is outside the engine's range 1..{self._max_batch}")
        if not self._context.set_input_shape(self._input, tuple(x.shape)):
            raise ModelError(f"engine rejects input shape {tuple(x.shape)}")
        out_shape = tuple(self._context.get_tensor_shape(self._output))
        out = np.empty(out_shape, dtype=self._out_dtype)
        d_in = self._buffer(self._input, x.nbytes)
        d_out = self._buffer(self._output, out.nbytes)
        for name in self._outputs[1:]:  # bound, not read back
            shape = tuple(self._context.get_tensor_shape(name))
            self._buffer(name, int(np.prod(shape)) * np.dtype(self._engine_nptype(name)).itemsize)
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, h2d, self._stream))
        if not self._context.execute_async_v3(int(self._stream)):  # TensorRT takes the raw handle
            raise ModelError("TensorRT execute_async_v3 failed")
        check(rt.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, d2h, self._stream))
        check(rt.cudaStreamSynchronize(self._stream))
        return out.astype(np.float32, copy=False)

    def _engine_nptype(self, name: str) -> Any:
        import tensorrt as trt

        return trt.nptype(self._engine.get_tensor_dtype(name))

    def deactivate(self) -> None:
        if self._engine is None:
            return
        from server.runtime.cuda import cudart

        rt = cudart()
        for ptr, _ in self._buffers.values():
            rt.cudaFree(ptr)
        self._buffers.clear()
        if self._stream is not None:
            rt.cudaStreamDestroy(self._stream)
        self._context = self._engine = self._stream = None
