"""Whether the TensorRT runtime is really installed here.

``importlib.util.find_spec("tensorrt")`` is not enough: the ``tensorrt-stubs`` package (which
``make lint`` installs to type-check the TensorRT path) leaves a ``tensorrt/`` directory of
``.pyi`` files, which Python finds as a namespace package with no code in it.
"""

from __future__ import annotations

import importlib.util


def tensorrt_installed() -> bool:
    """True if an importable TensorRT runtime (not only its type stubs) is installed."""
    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and spec.origin is not None and spec.loader is not None
