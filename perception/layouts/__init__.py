"""The output-layout registry: layout name (as a manifest declares it) -> its decoder.

A new layout is one decoder module beside these and one line in ``DECODERS``.
"""

from __future__ import annotations

from perception.errors import ManifestError
from perception.layouts.base import LayoutDecoder, TensorInfo
from perception.layouts.yolo_obj import YoloObj

DECODERS: dict[str, LayoutDecoder] = {
    d.name: d
    for d in (
        YoloObj(),
    )
}


def decoder_for(layout: str) -> LayoutDecoder:
    """The decoder of ``layout``; ManifestError naming the known ones if there is none."""
    try:
        return DECODERS[layout]
    except KeyError:
        raise ManifestError(f"unknown output_layout {layout!r}; known: {sorted(DECODERS)}") from None


__all__ = ["DECODERS", "LayoutDecoder", "TensorInfo", "decoder_for"]
