"""``build_model``: a freshly initialised detector of any family (``ModelConfig.family``).

Kept apart from the family modules so that they import their shared parts (``detector``'s
backbone and neck) without a cycle back to the dispatcher.
"""

from __future__ import annotations

from torch import nn

from build_engine.model.config import ModelConfig
from build_engine.model.detector import build_detector
from build_engine.model.rcnn import RcnnDetector
from build_engine.model.ssd import SsdDetector


def build_model(cfg: ModelConfig | None = None) -> nn.Module:
    """A detector of ``cfg.family``: yolo, ssd or rcnn (the family contract is in
    ``Detector``'s docstring)."""
    cfg = cfg or ModelConfig()
    if cfg.family == "ssd":
        return SsdDetector(cfg)
    if cfg.family == "rcnn":
        return RcnnDetector(cfg)
    return build_detector(cfg)
