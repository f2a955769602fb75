"""The output-layout registry: layout name (as a manifest declares it) -> its decoder.

A new layout is one decoder module beside these and one line in ``DECODERS``.
"""

from __future__ import annotations

from perception.errors import ManifestError
from perception.layouts.base import DecodeContext, LayoutDecoder, TensorInfo
from perception.layouts.nms_detections import NmsDetections
from perception.layouts.ssd import Ssd
from perception.layouts.yolo_obj import YoloObj
from perception.layouts.yolov5 import YoloV5
from perception.layouts.yolov8 import YoloV8

DECODERS: dict[str, LayoutDecoder] = {
    d.name: d
    for d in (
        YoloObj(),
        YoloV5(),
        YoloV8(),
        Ssd(),
        NmsDetections(),
    )
}


def decoder_for(layout: str) -> LayoutDecoder:
    """The decoder of ``layout``; ManifestError naming the known ones if there is none."""
    try:
        return DECODERS[layout]
    except KeyError:
        raise ManifestError(f"unknown output_layout {layout!r}; known: {sorted(DECODERS)}") from None


__all__ = ["DECODERS", "DecodeContext", "LayoutDecoder", "TensorInfo", "decoder_for"]
