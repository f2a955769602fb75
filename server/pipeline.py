"""The frame pipeline of the server, in two halves around inference.

``prepare``: decode (reduced-scale JPEG decode when the source is much larger than the model
input) -> letterbox exactly as the manifest says -> (H, W, 3) uint8 canvas; the batcher turns
canvases into the (B, 3, H, W) float32 model input (`to_batch`).
``finish``: the model's raw output row -> decode head -> NMS with the request's options ->
boxes in SOURCE pixels, clipped.

Pure of gRPC: the servicer converts protobuf to the dataclasses below, so the same pipeline
runs in-process (``run_batch``, used by the benchmark and ``perception verify-engine``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numpy.typing import NDArray

from perception.decode import decode_encoded, decode_raw, reduction_factor
from perception.errors import InvalidInputError
from perception.letterbox import Letterbox
from perception.manifest import Manifest, PostprocessSpec, PreprocessSpec
from perception.postprocess import PostprocessOptions, merge_options, postprocess
from perception.preprocess import letterbox_canvas, normalize_batch
from perception.types import Detections

MAX_CAMERA_ID_LEN = 128
# (B, 3, H, W) float32 -> (B, N, 5 + C) float32, e.g. Backend.infer.
InferFn = Callable[[NDArray[np.float32]], NDArray[np.float32]]


@dataclass(frozen=True)
class RawPixels:
    """Uncompressed pixels as a camera driver hands them over (see proto RawImage)."""

    width: int
    height: int
    row_stride: int  # bytes per row of the first plane; 0 = tightly packed
    pixel_format: int  # perception.decode.PixelFormat value
    data: bytes


@dataclass(frozen=True)
class FrameInput:
    """One frame of one camera: encoded JPEG/PNG bytes or raw pixels (exactly one)."""

    camera_id: str
    sequence: int
    capture_timestamp_ns: int
    encoded: bytes | None = None
    raw: RawPixels | None = None
    deadline_ms: int = 0  # 0 = none


@dataclass(frozen=True)
class RequestOptions:
    """Per-request options as sent; zero values mean "the manifest's default"."""

    score_threshold: float = 0.0
    iou_threshold: float = 0.0
    max_detections: int = 0
    class_filter: tuple[int, ...] = ()
    class_agnostic: bool = False


@dataclass
class Prepared:
    """A frame ready for inference.

    tensor: the (H, W, 3) uint8 letterboxed canvas (``FramePipeline.to_batch`` turns canvases
    into the float model input: queued frames take a quarter of the memory). letterbox:
    placement in SOURCE pixels (already corrected for a reduced-scale decode, whose placed
    image may span a few pixels more than the source: boxes are clipped to image_width x
    image_height in ``finish``).
    """

    tensor: NDArray[np.uint8] | None
    letterbox: Letterbox
    image_width: int
    image_height: int
    options: PostprocessOptions
    preprocess_s: float


class FramePipeline:
    """Pre- and post-processing of one model, as its manifest specifies them."""

    def __init__(
        self,
        preprocess: PreprocessSpec,
        postprocess: PostprocessSpec,
        classes: tuple[str, ...],
        reduced_decode: bool = True,
    ) -> None:
        self.spec = preprocess
        self.postprocess = postprocess
        self.classes = tuple(classes)
        self.reduced_decode = reduced_decode

    @classmethod
    def from_manifest(cls, manifest: Manifest, reduced_decode: bool = True) -> "FramePipeline":
        return cls(manifest.preprocess, manifest.postprocess, manifest.classes, reduced_decode)

    def options(self, req: RequestOptions) -> PostprocessOptions:
        """Merge request options over the manifest's defaults. Raises InvalidInputError."""
        if req.max_detections < 0:
            raise InvalidInputError(f"max_detections must be >= 0, got {req.max_detections}")
        return merge_options(
            self.postprocess,
            len(self.classes),
            score_threshold=float(req.score_threshold),
            iou_threshold=float(req.iou_threshold),
            max_detections=int(req.max_detections),
            class_filter=tuple(int(c) for c in req.class_filter),
            # proto3 bool has no "unset": true asks for agnostic NMS, false keeps the default.
            class_agnostic=True if req.class_agnostic else None,
        )

    def decode(self, frame: FrameInput) -> tuple[NDArray[np.uint8], int, int]:
        """(BGR image, source width, source height); the image may be a reduced-scale decode."""
        if (frame.encoded is None) == (frame.raw is None):
            raise InvalidInputError("frame must carry exactly one of encoded bytes or raw pixels")
        if frame.encoded is not None:
            need = (self.spec.input_width, self.spec.input_height) if self.reduced_decode else None
            return decode_encoded(frame.encoded, need)
        raw = frame.raw
        assert raw is not None
        img = decode_raw(raw.data, raw.width, raw.height, raw.pixel_format, raw.row_stride)
        return img, raw.width, raw.height

    def prepare(self, frame: FrameInput, req: RequestOptions) -> Prepared:
        """Validate, decode and letterbox one frame. Raises InvalidInputError on bad input."""
        t0 = time.perf_counter()
        if len(frame.camera_id) > MAX_CAMERA_ID_LEN:
            raise InvalidInputError(f"camera_id is longer than {MAX_CAMERA_ID_LEN} characters")
        opts = self.options(req)
        img, src_w, src_h = self.decode(frame)
        tensor, lb = letterbox_canvas(img, self.spec)
        if (img.shape[1], img.shape[0]) != (src_w, src_h):
            # Reduced-scale decode by f: pixel i of the reduced image covers source pixels
            # [i*f, (i+1)*f), so the placed image spans (reduced size * f) source pixels, which
            # is up to f - 1 more than the source when its size is not a multiple of f. Refer
            # the placement to that span; ``finish`` clips to the true source size.
            f = reduction_factor(src_w, src_h, (self.spec.input_width, self.spec.input_height))
            lb = dataclasses.replace(lb, src_w=img.shape[1] * f, src_h=img.shape[0] * f)
        return Prepared(tensor, lb, src_w, src_h, opts, time.perf_counter() - t0)

    def to_batch(self, canvases: list[NDArray[np.uint8]]) -> NDArray[np.float32]:
        """(B, 3, H, W) float32 model input from the canvases of ``prepare``."""
        return normalize_batch(canvases, self.spec)

    def finish(self, output: NDArray[np.floating], prepared: Prepared) -> Detections:
        """Raw head output (N, 5 + C) of this frame -> detections in source pixels."""
        det = postprocess(output, prepared.letterbox, prepared.options)
        lb = prepared.letterbox
        if len(det) and (lb.src_w, lb.src_h) != (prepared.image_width, prepared.image_height):
            boxes = det.boxes.copy()
            boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, prepared.image_width)
            boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, prepared.image_height)
            det = dataclasses.replace(det, boxes=boxes)
        return det

    def run_batch(
        self, frames: list[FrameInput], req: RequestOptions, infer: InferFn
    ) -> list[Detections]:
        """The whole pipeline in-process: prepare each frame, one inference, finish each."""
        prepared = [self.prepare(f, req) for f in frames]
        out = infer(self.to_batch([p.tensor for p in prepared]))  # type: ignore[misc]
        return [self.finish(out[i], p) for i, p in enumerate(prepared)]
