"""``ModelConfig``: the knobs of the detector family, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from perception.errors import ConfigError

ACTIVATIONS = ("relu", "leaky_relu", "silu", "hardswish")
# Detector families (the mission's design step): "yolo" anchor-free one-stage (the default),
# "ssd" single-shot with prior boxes and a background class, "rcnn" two-stage (proposals,
# RoIAlign, box head). ``build_engine.model.build_detector`` picks the module by this field.
FAMILIES = ("yolo", "ssd", "rcnn")
DEFAULT_CLASSES = ("car", "truck", "bus", "pedestrian", "cyclist", "traffic_light", "traffic_sign")
STRIDES = (8, 16, 32)

# Channels of the stem and the four backbone stages (strides 2, 4, 8, 16, 32) at width_mult 1.
BASE_CHANNELS = (32, 64, 128, 256, 512)
# Residual blocks per backbone stage (strides 4, 8, 16, 32) and per neck stage at depth_mult 1.
BASE_DEPTHS = (3, 6, 6, 3)
BASE_NECK_DEPTH = 3


@dataclass(frozen=True)
class ModelConfig:
    """One member of the detector family.

    input_width / input_height: model input in pixels (multiples of 32, the largest stride).
    width_mult / depth_mult scale channels (rounded to multiples of 8) and residual blocks.
    """

    num_classes: int = len(DEFAULT_CLASSES)
    width_mult: float = 0.25
    depth_mult: float = 0.33
    input_width: int = 512
    input_height: int = 288
    act: str = "relu"
    head_channels: int = 0  # 0 = the stride-8 neck width
    max_channels: int = 1024
    # Channel counts (and CSP hidden widths) are rounded up to this multiple. 16 fills the
    # INT8 dot-product kernels of AVX-512 VNNI CPUs and tensor cores: profiled per node here, a
    # 12-channel CSP conv ran *slower* in INT8 than in FP32 (0.36 vs 0.31 ms), while the 32-channel
    # head convs ran 2.8x faster (0.10 vs 0.28 ms).
    channel_multiple: int = 8
    family: str = "yolo"

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"model.num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 < self.width_mult <= 4.0 or not 0.0 < self.depth_mult <= 4.0:
            raise ConfigError(f"model width_mult/depth_mult must be in (0, 4], got {self.width_mult}/{self.depth_mult}")
        for name in ("input_width", "input_height"):
            v = getattr(self, name)
            if v <= 0 or v % max(STRIDES):
                raise ConfigError(f"model.{name} must be a positive multiple of {max(STRIDES)}, got {v}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"model.act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.head_channels < 0:
            raise ConfigError(f"model.head_channels must be >= 0, got {self.head_channels}")
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family must be one of {FAMILIES}, got {self.family!r}")
        if self.channel_multiple not in (8, 16, 32):
            raise ConfigError(f"model.channel_multiple must be 8, 16 or 32, got {self.channel_multiple}")

    def channels(self, base: int) -> int:
        """Scaled channel count, a multiple of ``channel_multiple``."""
        m = self.channel_multiple
        return max(m, int(math.ceil(min(base, self.max_channels) * self.width_mult / m)) * m)

    def depth(self, base: int) -> int:
        return max(1, round(base * self.depth_mult))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known: {sorted(known)}")
        return cls(**data)


PRESETS: dict[str, ModelConfig] = {
    "pico": ModelConfig(width_mult=0.125, depth_mult=0.33, input_width=384, input_height=224),
    "nano": ModelConfig(width_mult=0.25, depth_mult=0.33, input_width=512, input_height=288),
    # The shipped default: small's width at nano's input, channels in multiples of 16 and a
    # 32-channel head. INT8 runs it at about half the FP32 latency on a VNNI CPU; nano's
    # 8-channel early layers only reach about 0.7x.
    "edge": ModelConfig(width_mult=0.5, depth_mult=0.33, input_width=512, input_height=288,
                        head_channels=32, channel_multiple=16),
    "small": ModelConfig(width_mult=0.5, depth_mult=0.33, input_width=640, input_height=384),
    "medium": ModelConfig(width_mult=0.75, depth_mult=0.67, input_width=640, input_height=384),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
