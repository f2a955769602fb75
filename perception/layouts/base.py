"""What an output-layout decoder is: one model output convention, one name.

A decoder binds a model's named outputs to the roles its layout needs (checked once, when
the model is loaded), then turns ONE image's outputs into candidate detections in model-input
pixels. Whether the pipeline still runs its own NMS afterwards is the decoder's to say
(``applies_nms``): a model with NMS in the graph has already done it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from perception.errors import ModelError
from perception.options import PostprocessOptions
from perception.types import Detections

# One image's outputs by role (the batch axis already taken off).
RoleArrays = Mapping[str, NDArray[np.generic]]


@dataclass(frozen=True)
class TensorInfo:
    """A model output as its runtime reports it. ``shape``: ints, or None / a name for a
    dynamic axis. ``dtype``: numpy dtype name (``float32``, ``int64``, ...)."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str = "float32"


class LayoutDecoder(Protocol):
    """One output layout: its name, the roles it needs, and how one image's outputs decode."""

    name: str
    roles: tuple[str, ...]
    applies_nms: bool

    def bind(self, outputs: Sequence[TensorInfo], mapping: Mapping[str, str], num_classes: int) -> dict[str, str]:
        """{role: output name}; ``mapping`` (role -> name, may be empty) overrides matching.
        Raises ModelError naming the tensor and shape when the outputs do not fit."""
        ...

    def candidates(
        self, outputs: RoleArrays, options: PostprocessOptions, num_classes: int, ctx: DecodeContext | None = None
    ) -> Detections:
        """One image's candidates in model-input pixels, cut by threshold, class filter and
        pre-NMS top-k (or, for a post-NMS layout, the final detections before mapping back)."""
        ...

    def parts(self, outputs: RoleArrays) -> dict[str, tuple[str, NDArray[np.generic]]]:
        """One image's outputs as what they hold: {"boxes" / "scores" / ...: (the role read
        from, its values)}, only the values the decoder reads. A check of the values (the
        import refuses boxes that are all NaN) speaks of boxes, not of the one tensor that
        holds boxes and scores together; the shapes are the decoder's (``candidates`` ran)."""
        ...


def bind_single(layout: str, outputs: Sequence[TensorInfo], mapping: Mapping[str, str], role: str) -> dict[str, str]:
    """Bind a one-output layout: the mapped name, the only output, or a refusal."""
    names = [o.name for o in outputs]
    if role in mapping:
        if mapping[role] not in names:
            raise ModelError(f"layout {layout}: output {mapping[role]!r} mapped to {role!r} is not one of {names}")
        return {role: mapping[role]}
    if len(outputs) != 1:
        raise ModelError(f"layout {layout} reads one output but the model has {len(outputs)} ({names}); "
                         f"map it explicitly ({role}=NAME)")
    return {role: outputs[0].name}


def static_dim(info: TensorInfo, axis: int) -> int | None:
    """The size of ``axis`` if the runtime reports it as a fixed positive int."""
    if axis >= len(info.shape) or axis < -len(info.shape):
        return None
    d = info.shape[axis]
    return d if isinstance(d, int) and d > 0 else None


def top_candidates(
    boxes: NDArray[np.floating], scores: NDArray[np.floating], class_ids: NDArray[np.integer],
    options: PostprocessOptions,
) -> Detections:
    """Cut by score threshold and class filter, then keep the pre-NMS top-k (in model pixels)."""
    keep = scores >= options.score_threshold
    if options.class_filter:
        keep &= np.isin(class_ids, options.class_filter)
    idx = np.flatnonzero(keep)
    if idx.size > options.pre_nms_topk:
        idx = idx[np.argpartition(-scores[idx], options.pre_nms_topk - 1)[: options.pre_nms_topk]]
    if idx.size == 0:
        return Detections.empty()
    return Detections(np.asarray(boxes[idx], np.float32).reshape(-1, 4), np.asarray(scores[idx], np.float32),
                      np.asarray(class_ids[idx], np.int64))


@dataclass(frozen=True)
class DecodeContext:
    """What a decoder may need besides the outputs: the model's input size, and for an SSD
    with raw box offsets its prior boxes ``(N, 4)`` (cx, cy, w, h normalised to 0..1) and the
    two variances; ``class_offset`` is subtracted from a post-NMS model's class ids (1 for a
    torchvision-style export whose class 0 is the background)."""

    input_width: int
    input_height: int
    priors: NDArray[np.float32] | None = None
    variances: tuple[float, float] = (0.1, 0.2)
    class_offset: int = 0


def find_output(
    layout: str, role: str, outputs: Sequence[TensorInfo], mapping: Mapping[str, str], names: Sequence[str],
    taken: set[str],
) -> TensorInfo | None:
    """The output playing ``role``: the explicitly mapped one, else the first of the family's
    usual ``names`` present, spelt exactly or else in another case, else None (the caller
    matches by shape). Outputs that differ only in case (``output0`` and ``OUTPUT0``: a head
    and an auxiliary output) used to be folded into one name, the later silently winning: the
    exact spelling wins now, and several other-case matches are refused."""
    by_name = {o.name: o for o in outputs}
    if role in mapping:
        if mapping[role] not in by_name:
            raise ModelError(f"layout {layout}: output {mapping[role]!r} mapped to {role!r} is not one of "
                             f"{list(by_name)}")
        return by_name[mapping[role]]
    free = [o for o in outputs if o.name not in taken]
    for n in names:
        exact = [o for o in free if o.name == n]
        if exact:
            return exact[0]
        folded = [o for o in free if o.name.lower() == n.lower()]
        if len(folded) > 1:
            raise ModelError(f"layout {layout}: outputs {[o.name for o in folded]} differ only in case, and "
                             f"none is spelt {n!r}: map the one that is {role!r} explicitly ({role}=NAME)")
        if folded:
            return folded[0]
    return None


def describe(outputs: Sequence[TensorInfo]) -> str:
    return ", ".join(f"{o.name} {list(o.shape)} {o.dtype}" for o in outputs)


def bind_one_rank3(
    layout: str, outputs: Sequence[TensorInfo], mapping: Mapping[str, str], names: Sequence[str], axis: int,
    expected: int, shape_text: str,
) -> dict[str, str]:
    """Bind a one-output layout whose output is rank 3 with ``expected`` entries on ``axis``: by
    mapping, usual name, or as the only rank-3 output. ``shape_text``: the shape wanted, as the
    refusal should say it, e.g. "(B, N, 85) for 80 classes"."""
    info = find_output(layout, "predictions", outputs, mapping, names, set())
    if info is None:
        rank3 = [o for o in outputs if len(o.shape) == 3]
        if len(rank3) != 1:
            raise ModelError(f"layout {layout} reads one rank-3 output; the model has {describe(outputs)}: "
                             "map it explicitly (predictions=NAME)")
        info = rank3[0]
    size = static_dim(info, axis)
    if len(info.shape) != 3 or (size is not None and size != expected):
        raise ModelError(f"layout {layout}: output {info.name!r} has shape {list(info.shape)}, expected {shape_text}")
    return {"predictions": info.name}
