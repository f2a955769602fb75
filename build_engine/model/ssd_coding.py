"""SSD box coding: offsets against prior boxes with variances (Liu et al. 2016), shared by
the model's in-graph decode and its loss's targets."""

from __future__ import annotations

import math

import torch

# Box-coding variances (Liu et al. 2016): offsets are scaled to about unit variance.
VARIANCES = (0.1, 0.2)
# Cap on dw * v1 and dh * v1 before exp: a 62x growth of a prior is beyond any box, and
# exp(4.14) stays far inside fp16 range (torchvision's bbox_xform_clip, log(1000 / 16)).
MAX_LOG_SCALE = math.log(1000.0 / 16)


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def encode(boxes: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Offsets (..., 4) dx dy dw dh of corner boxes (..., 4) x1 y1 x2 y2 against priors cx cy w h,
    all normalised; the inverse of ``decode``. Degenerate boxes get a finite (large) dw / dh."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-6)
    cxcy = (boxes[..., :2] + boxes[..., 2:]) / 2
    d_xy = (cxcy - priors[..., :2]) / (VARIANCES[0] * priors[..., 2:])
    d_wh = torch.log(wh / priors[..., 2:]) / VARIANCES[1]
    return torch.cat([d_xy, d_wh], -1)


def decode(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Corner boxes (..., 4) from offsets (..., 4) against priors (broadcast), all normalised:
    cx = pcx + dx * v0 * pw, w = pw * exp(dw * v1) (``perception.layouts.ssd.decode_offsets``),
    with dw * v1 capped at ``MAX_LOG_SCALE`` so fp16 cannot overflow."""
    cxcy = priors[..., :2] + offsets[..., :2] * VARIANCES[0] * priors[..., 2:]
    wh = priors[..., 2:] * torch.exp((offsets[..., 2:] * VARIANCES[1]).clamp(max=MAX_LOG_SCALE))
    return torch.cat([cxcy - wh / 2, cxcy + wh / 2], -1)
