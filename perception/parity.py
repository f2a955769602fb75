"""Detection-level agreement of two models on the same frames (a variant vs FP32, an engine vs
its ONNX model): pure numpy, used by the build gate and ``perception verify-engine``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from perception.boxes import box_iou
from perception.types import Detections

# A detection "moved" if its best same-class match is below this IoU.
PARITY_IOU = 0.9
# Below this IoU the best match is no match at all: the detection vanished / appeared.
MATCH_IOU = 0.5


def parity(reference: Sequence[Detections], other: Sequence[Detections], iou: float = PARITY_IOU) -> dict[str, float]:
    """Detection-level agreement of ``other`` with ``reference``, image by image.

    Greedy same-class matching in descending reference score. Returns shares in [0, 1]:
    ``vanished`` (reference detections with no match at IoU >= 0.5), ``moved`` (matched but
    below ``iou``), ``appeared`` (other's detections left unmatched, as a share of other's),
    ``stable`` (matched at >= ``iou``), and the raw counts.
    """
    if len(reference) != len(other):
        raise ValueError(f"parity needs the same images: {len(reference)} vs {len(other)}")
    n_ref = n_oth = vanished = moved = stable = 0
    for ref, oth in zip(reference, other, strict=True):
        n_ref += len(ref)
        n_oth += len(oth)
        used = np.zeros(len(oth), bool)
        if len(ref) and len(oth):
            ious = box_iou(ref.boxes, oth.boxes)
            # Identical boxes agree even when degenerate (zero area, e.g. clipped at the border).
            ious[np.all(ref.boxes[:, None, :] == oth.boxes[None, :, :], axis=2)] = 1.0
            ious[ref.class_ids[:, None] != oth.class_ids[None, :]] = 0.0
        for i in np.argsort(-ref.scores, kind="stable"):
            if not len(oth):
                vanished += 1
                continue
            cand = np.where(used, -1.0, ious[i])
            j = int(np.argmax(cand))
            if cand[j] < MATCH_IOU:
                vanished += 1
                continue
            used[j] = True
            if cand[j] >= iou:
                stable += 1
            else:
                moved += 1
    appeared = n_oth - stable - moved
    return {
        "vanished": vanished / n_ref if n_ref else 0.0,
        "moved": moved / n_ref if n_ref else 0.0,
        "appeared": appeared / n_oth if n_oth else 0.0,
        "stable": stable / n_ref if n_ref else 1.0,
        "reference_detections": float(n_ref),
        "variant_detections": float(n_oth),
        "iou": iou,
    }
