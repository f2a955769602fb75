"""A replay as an evaluation: the answered frames scored against COCO ground truth with the
same KPI code as ``perception eval`` (perception.kpi.evaluate_coco).

Only ground-truth images that were replayed and answered OK are scored, so a replay with
``--skip`` or ``--max-frames`` measures the frames it saw rather than counting the rest as
missed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from client.frames import FrameResult, FrameStatus
from client.ground_truth import GroundTruthIndex, coco_predictions
from perception.errors import DataError

log = logging.getLogger(__name__)


def evaluate_replay(
    results: list[FrameResult],
    gt: GroundTruthIndex,
    score_threshold: float = 0.25,
    file_names: dict[tuple[str, int], str] | None = None,
    model_classes: Sequence[str] = (),
) -> dict[str, Any]:
    """KPI dict (map50_95, map50, precision, recall, ...) plus how the frames matched and what
    was left out: frames_without_gt, gt_images_not_replayed, unknown_class_detections (of a class
    the ground truth has no category for) and classes_matched_by ("name" or "class id").
    DataError when no frame or two frames match one image, or a frame is not its image's size."""
    from perception.kpi import evaluate_coco

    preds = coco_predictions(results, gt, file_names, model_classes)
    seen = set(preds.image_ids.values())
    other_size: list[str] = []
    for r in results:
        iid = preds.image_ids.get((r.camera_id, r.sequence))
        if r.status is not FrameStatus.OK or iid is None:
            continue
        image = gt.dataset.images[iid]
        # (0: a saved record that does not say its size)
        if r.image_width > 0 and r.image_height > 0 and (r.image_width, r.image_height) != (image.width,
                                                                                            image.height):
            other_size.append(f"{r.camera_id}/{r.sequence}: {r.image_width}x{r.image_height} answered, "
                              f"{image.width}x{image.height} in the ground truth ({image.file_name})")
    if other_size:
        # Boxes come back in the frame's pixels: scored against another size they are scored in
        # the wrong place, and the KPI would be near 0 with nothing to say why.
        raise DataError(f"{len(other_size)} replayed frames are not the size of their ground-truth image, e.g. "
                        f"{other_size[0]}: a recording re-encoded at another resolution, or frames matched to the "
                        "wrong images")
    if not seen:
        raise DataError(
            f"{gt.path or 'ground truth'}: no replayed frame matches a ground-truth image "
            "(by camera_id + sequence or file_name)"
        )
    raw = gt.dataset.raw
    subset = {
        **{k: v for k, v in raw.items() if not k.startswith("_")},
        "images": [im for im in raw["images"] if im["id"] in seen],
        "annotations": [a for a in raw.get("annotations", []) if a.get("image_id") in seen],
    }
    report = evaluate_coco(subset, preds.records, score_threshold)
    out = report.to_dict(curves=False)
    out.update(
        frames_evaluated=len(seen),
        frames_without_gt=preds.frames_without_gt,
        gt_images_not_replayed=len(gt.dataset.images) - len(seen),
        unknown_class_detections=preds.unknown_class_detections,
        classes_matched_by=preds.classes_matched_by,
    )
    return out


def classes_of_answers(results: Sequence[FrameResult], classes: tuple[str, ...], version: str,
                       whence: str) -> tuple[str, ...]:
    """``classes`` (the class list of model ``version``) if that model answered every OK frame
    that says which model answered it, else (): another model (one swapped in mid-replay) may
    name other classes, and scoring then goes by the names the answers carry, as without a
    list. ``version`` "" (a list of names alone): ``classes`` as they are."""
    others = {r.model_version for r in results if r.status is FrameStatus.OK and r.model_version} - {version}
    if version and others and classes:
        log.warning("frames were answered by model %s, not only by %s whose classes were %s: scoring matches classes "
                    "by the names the answers carry", ", ".join(sorted(others)), version, whence)
        return ()
    return classes
