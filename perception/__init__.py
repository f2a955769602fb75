"""The shared, framework-free kernel: types, geometry, pre/post-processing, KPI, manifest."""

__version__ = "0.1.0"
