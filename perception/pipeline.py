"""The frame pipeline: the only path from image bytes to detections.

``prepare``: decode (reduced-scale JPEG decode when the source is much larger than the model
input) -> letterbox exactly as the manifest says -> (H, W, 3) uint8 canvas; ``to_batch`` turns
canvases into the (B, 3, H, W) float32 model input. ``finish``: one frame's named model
outputs -> the manifest's output-layout decoder -> NMS with the request's options -> boxes in
SOURCE pixels, clipped.

The server, ``perception eval``, training-time validation, label QA, INT8 calibration, the
build gate and ``perception verify-engine`` all go through this class, so a model is
calibrated, validated and gated on exactly the pixels it is served on. Pure of gRPC and
torch: callers convert their inputs to the dataclasses below.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from perception.decode import DEFAULT_LIMITS, DecodeLimits, ImageBytes, decode_encoded, decode_raw, reduction_factor
from perception.errors import DataError, InvalidInputError, ModelError
from perception.layouts import DecodeContext, TensorInfo, decoder_for
from perception.letterbox import Letterbox
from perception.manifest import Manifest, PostprocessSpec, PreprocessSpec
from perception.postprocess import PostprocessOptions, merge_options, postprocess
from perception.preprocess import letterbox_canvas, normalize_batch
from perception.types import Detections

MAX_CAMERA_ID_LEN = 128
# Detections kept when a model is scored (eval, training validation, the build gate): COCO's
# mAP ranks every detection down to a floor, not only the confident ones.
EVAL_SCORE_FLOOR = 0.001

# Named model outputs of a batch: output name -> (B, ...) array.
Outputs = Mapping[str, NDArray[Any]]
# (B, 3, H, W) float32 -> every output by name, e.g. ``Backend.infer``.
InferFn = Callable[[NDArray[np.float32]], Outputs]


@dataclass(frozen=True)
class RawPixels:
    """Uncompressed pixels as a camera driver hands them over (see proto RawImage)."""

    width: int
    height: int
    row_stride: int  # bytes per row of the first plane; 0 = tightly packed
    pixel_format: int  # perception.decode.PixelFormat value
    data: ImageBytes


@dataclass(frozen=True)
class SharedMemorySlot:
    """Where a frame's pixels wait in a shared-memory ring on the server's host (see proto
    SharedMemoryRef): the client's ring writes them (client.shm_ring), the server copies them
    out of segment ``segment`` at ``offset`` if the slot still holds ``generation`` (server.shm)."""

    segment: str
    offset: int
    byte_size: int
    generation: int
    width: int
    height: int
    row_stride: int  # bytes per row of the first plane; 0 = tightly packed
    pixel_format: int  # perception.decode.PixelFormat value


@dataclass(frozen=True)
class FrameInput:
    """One frame of one camera: encoded JPEG/PNG bytes or raw pixels (exactly one)."""

    camera_id: str
    sequence: int
    capture_timestamp_ns: int
    encoded: ImageBytes | None = None
    raw: RawPixels | None = None
    deadline_ms: int = 0  # 0 = none
    # Sent again on a new connection, unanswered on the last (the wire's Frame.resent): a tracked
    # camera answers it with the track ids it got, and does not take it for a restart. None: the
    # client did not say (one older than the field); the tracker guesses.
    resent: bool | None = None


@dataclass(frozen=True)
class RequestOptions:
    """Per-request options as sent; zero values mean "the manifest's default"."""

    score_threshold: float = 0.0
    iou_threshold: float = 0.0
    max_detections: int = 0
    class_filter: tuple[int, ...] = ()
    class_agnostic: bool = False
    track: bool = False  # give each detection a track id (per stream and camera)


# What scoring a model asks of every frame: every detection down to the floor; the other
# options stay the manifest's defaults.
EVAL_REQUEST = RequestOptions(score_threshold=EVAL_SCORE_FLOOR)


@dataclass
class Prepared:
    """A frame ready for inference.

    tensor: the (H, W, 3) uint8 letterboxed canvas (``FramePipeline.to_batch`` turns canvases
    into the float model input: queued frames take a quarter of the memory). letterbox:
    placement in SOURCE pixels (already corrected for a reduced-scale decode, whose placed
    image may span a few pixels more than the source: ``finish`` clips boxes to image_width x
    image_height, before the max_detections cut).
    """

    tensor: NDArray[np.uint8] | None
    letterbox: Letterbox
    image_width: int
    image_height: int
    options: PostprocessOptions
    preprocess_s: float


def load_priors(path: Path, sha256: str = "") -> NDArray[np.float32]:
    """An SSD's prior boxes, (N, 4) float32 cx cy w h normalised; ManifestError if malformed.

    With ``sha256`` (the manifest's), loaded from bytes read once and checked against it: the
    manifest's check hashed the file when it loaded, and a server loads the engine in between
    (minutes for a TensorRT build), so reading the path again could load other priors."""
    from perception.errors import ManifestError
    from perception.manifest.files import read_checked

    try:
        source: Path | io.BytesIO = io.BytesIO(read_checked(path, sha256, "priors")) if sha256 else path
        priors = np.load(source, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: cannot read prior boxes: {exc}") from exc
    if priors.ndim != 2 or priors.shape[1] != 4 or not np.all(np.isfinite(priors)):
        raise ManifestError(f"{path}: prior boxes must be a finite (N, 4) array, got {priors.shape}")
    return np.asarray(priors, np.float32)


def file_frame(path: Path, sequence: int = 0, camera_id: str = "file", sha256: str = "") -> FrameInput:
    """An image file as the server receives it from ``perception replay``: its encoded bytes
    (with ``sha256``, the bytes must have it: ManifestError otherwise)."""
    if sha256:
        from perception.manifest.files import read_checked

        return FrameInput(camera_id=camera_id, sequence=sequence, capture_timestamp_ns=0,
                          encoded=read_checked(Path(path), sha256, "verification frame"))
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read image: {exc}") from exc
    return FrameInput(camera_id=camera_id, sequence=sequence, capture_timestamp_ns=0, encoded=data)


def frame_outputs(outputs: Outputs, index: int) -> dict[str, NDArray[Any]]:
    """Frame ``index``'s outputs of a batch, copied so that one slow reader does not keep the
    whole batch's output alive."""
    return {name: np.array(arr[index]) for name, arr in outputs.items()}


class FramePipeline:
    """Pre- and post-processing of one model, as its manifest specifies them."""

    def __init__(
        self,
        preprocess: PreprocessSpec,
        postprocess: PostprocessSpec,
        classes: Sequence[str],
        reduced_decode: bool = True,
        priors: NDArray[np.float32] | None = None,
        limits: DecodeLimits = DEFAULT_LIMITS,
    ) -> None:
        self.spec = preprocess
        self.limits = limits
        self.postprocess = postprocess
        self.classes = tuple(classes)
        self.reduced_decode = reduced_decode
        self.decoder = decoder_for(postprocess.output_layout)
        self._roles: dict[str, str] | None = None  # role -> output name, once bound
        variances = postprocess.priors.variances if postprocess.priors is not None else (0.1, 0.2)
        self.context = DecodeContext(preprocess.input_width, preprocess.input_height, priors, variances,
                                     postprocess.class_offset)

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, reduced_decode: bool = True, limits: DecodeLimits = DEFAULT_LIMITS
    ) -> FramePipeline:
        priors = None
        if manifest.postprocess.priors is not None:
            ref = manifest.postprocess.priors
            priors = load_priors(manifest.path_of(ref.file), ref.sha256)
        return cls(manifest.preprocess, manifest.postprocess, manifest.classes, reduced_decode, priors, limits)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def bind_outputs(self, outputs: Sequence[TensorInfo]) -> dict[str, str]:
        """Check a loaded model's outputs against the declared layout and remember which output
        plays which role. Raises ModelError naming the tensor and shape on a mismatch."""
        self._roles = self.decoder.bind(outputs, self.postprocess.outputs, self.num_classes)
        return dict(self._roles)

    def options(self, req: RequestOptions) -> PostprocessOptions:
        """Merge request options over the manifest's defaults. Raises InvalidInputError."""
        if req.max_detections < 0:
            raise InvalidInputError(f"max_detections must be >= 0, got {req.max_detections}")
        return merge_options(
            self.postprocess,
            self.num_classes,
            score_threshold=float(req.score_threshold),
            iou_threshold=float(req.iou_threshold),
            max_detections=int(req.max_detections),
            class_filter=tuple(int(c) for c in req.class_filter),
            # proto3 bool has no "unset": true asks for agnostic NMS, false keeps the default.
            class_agnostic=True if req.class_agnostic else None,
        )

    def decode(self, frame: FrameInput) -> tuple[NDArray[np.uint8], int, int]:
        """(BGR image, source width, source height); the image may be a reduced-scale decode."""
        if frame.encoded is not None and frame.raw is None:
            need = (self.spec.input_width, self.spec.input_height) if self.reduced_decode else None
            return decode_encoded(frame.encoded, need, self.limits)
        if frame.raw is not None and frame.encoded is None:
            raw = frame.raw
            img = decode_raw(raw.data, raw.width, raw.height, raw.pixel_format, raw.row_stride, self.limits)
            return img, raw.width, raw.height
        raise InvalidInputError("frame must carry exactly one of encoded bytes or raw pixels")

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

    def to_batch(self, canvases: Sequence[NDArray[np.uint8] | None]) -> NDArray[np.float32]:
        """(B, 3, H, W) float32 model input from the canvases of ``prepare``."""
        if any(c is None for c in canvases):
            raise ValueError("a frame's canvas was released before it was batched")
        return normalize_batch([c for c in canvases if c is not None], self.spec)

    def check_finite(self, outputs: Outputs) -> None:
        """ModelError when, on any frame of a run (``outputs`` with the batch axis), a part of
        what the layout's decoder reads holds no finite value (``check_frame``): the warm-up's
        and the verification's test of a whole model."""
        arrays = {name: np.asarray(a) for name, a in outputs.items()}
        if not arrays or any(a.ndim == 0 for a in arrays.values()):
            return  # no batch axis to read frames along: nothing the decoder could take either
        for i in range(min(len(a) for a in arrays.values())):
            self.check_frame({name: a[i] for name, a in arrays.items()})

    def check_frame(self, outputs: Outputs) -> None:
        """ModelError when a part of what the layout's decoder reads of one frame's outputs (its
        boxes, scores, objectness...; a post-NMS model's rows up to ``num_dets`` only, as the
        import judges them) holds no finite value: a model that diverged, or an export or
        quantization gone wrong. Post-processing drops non-finite candidates, so such a model
        answered every frame OK with no detection, and health and probation saw nothing wrong.
        Each part is judged on its own (finite boxes beside NaN scores in one tensor are
        caught); O(1) per part unless its first value is not finite. The server judges each
        frame of a batch alone, so one frame's NaN costs only that frame its answer."""
        roles = self._role_arrays(outputs)
        try:
            parts = self.decoder.parts(roles)
        except (IndexError, ValueError) as exc:  # e.g. an output at another rank than it bound with
            raise ModelError(f"the model's outputs do not read as the {self.postprocess.output_layout} layout: "
                             f"{exc}") from exc
        for part, (role, values) in parts.items():
            v = np.asarray(values)
            if v.size and v.dtype.kind in "fc" and not np.isfinite(v.flat[0]) and not np.isfinite(v).any():
                name = (self._roles or {}).get(role, role)
                raise ModelError(f"the model's {part} (output {name!r}) are all NaN or infinite: it computes "
                                 "nothing usable on this runtime")

    def _role_arrays(self, outputs: Outputs) -> dict[str, NDArray[Any]]:
        if self._roles is None:
            # Not bound at load (e.g. a PyTorch module in training): bind from what came back.
            infos = [TensorInfo(n, (None, *np.shape(a)), str(np.asarray(a).dtype)) for n, a in outputs.items()]
            self.bind_outputs(infos)
        assert self._roles is not None
        try:
            return {role: outputs[name] for role, name in self._roles.items()}
        except KeyError as exc:
            raise ModelError(f"the model returned no output {exc} (it returned {sorted(outputs)})") from None

    def finish(self, outputs: Outputs, prepared: Prepared) -> Detections:
        """One frame's model outputs (name -> array without the batch axis) -> detections in
        source pixels."""
        # Clipped to the true source size, which a reduced-scale decode's placement can exceed.
        return postprocess(self._role_arrays(outputs), prepared.letterbox, prepared.options, self.decoder,
                           self.num_classes, self.context, (prepared.image_width, prepared.image_height))

    def run_batch(self, frames: Sequence[FrameInput], req: RequestOptions, infer: InferFn) -> list[Detections]:
        """The whole pipeline in-process: prepare each frame, one inference, finish each."""
        prepared = [self.prepare(f, req) for f in frames]
        out = infer(self.to_batch([p.tensor for p in prepared]))
        return [self.finish(frame_outputs(out, i), p) for i, p in enumerate(prepared)]

    def model_inputs(self, frames: Iterable[FrameInput]) -> NDArray[np.float32]:
        """The (B, 3, H, W) float32 input the server would build for these frames (calibration,
        latency samples); InvalidInputError if the server would refuse one."""
        return self.to_batch([self.prepare(f, RequestOptions()).tensor for f in frames])

    def detect_files(
        self, paths: Sequence[Path], infer: InferFn, request: RequestOptions = EVAL_REQUEST, batch_size: int = 8,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Detections]:
        """Detections of image files, ``batch_size`` frames per inference, as served; DataError
        naming the file if the server would refuse it."""
        out: list[Detections] = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            prepared = []
            for k, path in enumerate(chunk):
                try:
                    prepared.append(self.prepare(file_frame(path, start + k), request))
                except InvalidInputError as exc:
                    raise DataError(f"{path}: the server would refuse this image: {exc}") from exc
            batch_out = infer(self.to_batch([p.tensor for p in prepared]))
            for i, prep in enumerate(prepared):
                prep.tensor = None
                out.append(self.finish(frame_outputs(batch_out, i), prep))
            if progress is not None:
                progress(min(start + batch_size, len(paths)), len(paths))
        return out

