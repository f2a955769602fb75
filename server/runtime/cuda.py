"""The few CUDA runtime calls the TensorRT backend needs, through NVIDIA's cuda-python bindings.

Imported only by the TensorRT modules, and lazily: a CPU-only install never loads it.
"""

from __future__ import annotations

from typing import Any

from perception.errors import ModelError


def cudart() -> Any:
    """The ``cudart`` module of cuda-python (new ``cuda.bindings`` layout first, then the old one)."""
    try:
        from cuda.bindings import runtime as rt  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as rt  # older cuda-python
        except ImportError as exc:
            raise ModelError("the CUDA runtime bindings are missing (pip install cuda-python)") from exc
    return rt


def check(result: Any) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple; raise ModelError on an error code."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != int(rt.cudaError_t.cudaSuccess):
        raise ModelError(f"CUDA call failed: {rt.cudaGetErrorString(err)[1]!r} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_properties(device: int = 0) -> tuple[int, int, str]:
    """(compute capability major, minor, device name) of a GPU."""
    rt = cudart()
    props = check(rt.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return int(props.major), int(props.minor), name.rstrip("\x00")
