"""Frame sources: recordings read as timestamp-ordered ``SourceFrame``s (interface in base.py,
the path -> reader choice in registry.py)."""

from client.sources.base import FrameSource, SourceOptions
from client.sources.registry import SourceKind, open_source

__all__ = ["FrameSource", "SourceKind", "SourceOptions", "open_source"]
