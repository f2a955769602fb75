"""Frame sources: recordings read as timestamp-ordered ``SourceFrame``s (see base.py)."""

from client.sources.base import FrameSource, open_source

__all__ = ["FrameSource", "open_source"]
