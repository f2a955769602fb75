"""The detector family: one definition, presets (nano, small, ...) by width/depth/input size."""

from build_engine.model.blocks import ConvBNAct, CSPStage, ResidualBlock
from build_engine.model.config import PRESETS, ModelConfig, preset
from build_engine.model.detector import Detector, build_detector
from build_engine.model.factory import build_model

__all__ = [
    "ConvBNAct",
    "ResidualBlock",
    "CSPStage",
    "ModelConfig",
    "PRESETS",
    "preset",
    "Detector",
    "build_detector",
    "build_model",
]
