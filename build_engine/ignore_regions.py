"""Ignore regions: COCO crowd boxes (``iscrowd``) as the training losses see them.

A crowd box is one box around a group of objects (people in a crowd): no object to find, and
no background either. Evaluation (``perception.kpi``) ignores a detection whose intersection
over its own area (IoF) with a crowd box reaches the IoU threshold; training does the same for
its negatives. A prediction that falls in an ignore region and is assigned to no real object is
neither positive nor negative: it adds nothing to the objectness / background loss, so the model
is not taught to miss the objects in crowds. A prediction assigned to a real object inside a
crowd box trains as usual.

Which predictions fall in a region follows each family's assigner: a YOLO-style cell (and the
two-stage family's proposal cell) by its centre strictly inside the region, as SimOTA picks
candidate cells inside ground truths; an SSD prior or a two-stage RoI by its IoF with the region
(``IGNORE_IOF``), as those are matched by overlap.

Regions are (K, 4) xyxy tensors in the same units as the boxes or points they are tested against.
With no regions (K = 0) every mask is all False: the losses then take exactly their no-crowd path.
"""

from __future__ import annotations

import torch

# COCO's lowest IoU threshold: evaluation ignores a detection whose IoF with a crowd box is
# >= 0.5 there (``perception.kpi.iou_matrix``), so at 0.5 training ignores every prediction any
# threshold of mAP50-95 would.
IGNORE_IOF = 0.5


def box_iof(boxes: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(N, K) intersection of each of ``boxes`` (N, 4) with each of ``regions`` (K, 4), over the
    box's own area (0 for a box without area). Both xyxy, same units."""
    lt = torch.maximum(boxes[:, None, :2], regions[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(-1)
    # A box without area has no intersection either: 0 / tiny = 0.
    return inter / area[:, None].clamp(min=torch.finfo(inter.dtype).tiny)


def boxes_in_regions(boxes: torch.Tensor, regions: torch.Tensor, min_iof: float = IGNORE_IOF) -> torch.Tensor:
    """(N,) bool: the box's IoF with some region is >= ``min_iof``. boxes (N, 4), regions (K, 4) xyxy."""
    if regions.shape[0] == 0:
        return torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    return (box_iof(boxes, regions.to(boxes.dtype)) >= min_iof).any(1)


def points_in_regions(points: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the point (N, 2) x y lies strictly inside some region (K, 4) xyxy."""
    if regions.shape[0] == 0:
        return torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    r = regions.to(points.dtype)
    x, y = points[:, 0:1], points[:, 1:2]
    inside = (x > r[None, :, 0]) & (x < r[None, :, 2]) & (y > r[None, :, 1]) & (y < r[None, :, 3])
    return inside.any(1)
