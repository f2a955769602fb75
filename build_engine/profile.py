"""MAC / parameter profiler: one forward pass with hooks on every leaf module.

Units, stated once so nobody mixes them up:

* **MACs** = multiply-accumulate operations for the whole input given (batch included).
* **FLOPs** = 2 x MACs (one multiply + one add). Reported separately, never mixed.

Counting rules per leaf module (OC/IC = output/input channels, K = kernel size):

* ``Conv{1,2,3}d``: OC x prod(output spatial) x prod(K) x IC / groups per image. The groups
  term matters: a depthwise conv without it would be over-counted IC times.
* ``ConvTranspose{1,2,3}d``: IC x prod(input spatial) x prod(K) x OC / groups per image.
* ``Linear``: output elements x in_features. ``Bilinear``: output elements x in1 x in2.
* Normalisation layers with an affine transform (BatchNorm, LayerNorm, GroupNorm, ...):
  one MAC per output element (scale and shift). They vanish after BN folding.
* Everything else (activations, pooling, upsampling, identity): 0 MACs, listed with its
  output shape for completeness.

The published figure for MobileNetV2 at 224x224 (about 300 M MACs) counts convolutions and the
classifier only; ``conv_linear_macs`` is that number, ``total_macs`` adds the norm layers.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from perception.errors import ConfigError, InvalidInputError, ModelError

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class LayerProfile:
    """One call of one leaf module."""

    name: str
    type: str
    kind: str  # "conv", "linear", "norm" or "other"
    macs: int
    params: int
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class ProfileResult:
    input_shape: tuple[int, ...]
    layers: tuple[LayerProfile, ...]
    total_params: int
    macs_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def conv_linear_macs(self) -> int:
        return self.macs_by_kind.get("conv", 0) + self.macs_by_kind.get("linear", 0)

    @property
    def total_flops(self) -> int:
        return 2 * self.total_macs

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "units": {
                "macs": "multiply-accumulates for the whole input (batch included)",
                "flops": "2 x MACs",
                "params": "parameter elements",
            },
            "total_macs": self.total_macs,
            "conv_linear_macs": self.conv_linear_macs,
            "total_flops": self.total_flops,
            "total_params": self.total_params,
            "macs_by_kind": dict(self.macs_by_kind),
            "layers": [dict(asdict(layer), output_shape=list(layer.output_shape)) for layer in self.layers],
        }


def layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> tuple[str, int]:
    """(kind, MACs) of one call of a leaf ``module`` with input ``inp`` and output ``out``."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        k = math.prod(module.kernel_size)
        return "conv", inp.numel() * k * module.out_channels // module.groups
    if isinstance(module, nn.modules.conv._ConvNd):
        k = math.prod(module.kernel_size)
        return "conv", out.numel() * k * module.in_channels // module.groups
    if isinstance(module, nn.Linear):
        return "linear", out.numel() * module.in_features
    if isinstance(module, nn.Bilinear):
        return "linear", out.numel() * module.in1_features * module.in2_features
    if isinstance(module, _NORMS):
        affine = getattr(module, "affine", getattr(module, "elementwise_affine", True))
        return "norm", out.numel() if affine else 0
    return "other", 0


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for item in x:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def profile_model(model: nn.Module, input_shape: tuple[int, ...]) -> ProfileResult:
    """Run ``model`` once on zeros of ``input_shape`` (e.g. (1, 3, 288, 512)) and count.

    The model is put in eval mode; nothing about it is changed otherwise.
    """
    if len(input_shape) != 4 or any(int(d) <= 0 for d in input_shape):
        raise InvalidInputError(f"input shape must be 4 positive dims NxCxHxW, got {'x'.join(map(str, input_shape))}")
    rows: list[LayerProfile] = []
    calls: dict[str, int] = {}
    seen_params: set[int] = set()

    def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def _hook(module: nn.Module, args: Any, output: Any) -> None:
            inp, out = _first_tensor(args), _first_tensor(output)
            if inp is None or out is None:
                return
            kind, macs = layer_macs(module, inp, out)
            n = calls.get(name, 0)
            calls[name] = n + 1
            own = [p for p in module.parameters(recurse=False) if id(p) not in seen_params]
            seen_params.update(id(p) for p in own)
            rows.append(
                LayerProfile(
                    name=name if n == 0 else f"{name}#{n}",
                    type=type(module).__name__,
                    kind=kind,
                    macs=int(macs),
                    params=sum(p.numel() for p in own),
                    output_shape=tuple(out.shape),
                )
            )

        return _hook

    handles = [
        m.register_forward_hook(hook(name or type(m).__name__))
        for name, m in model.named_modules()
        if not list(m.children())
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(*map(int, input_shape)))
    except Exception as exc:
        raise ModelError(f"model forward failed on input {tuple(input_shape)}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    by_kind: dict[str, int] = {}
    for r in rows:
        by_kind[r.kind] = by_kind.get(r.kind, 0) + r.macs
    total_params = sum(p.numel() for p in model.parameters())
    return ProfileResult(tuple(int(d) for d in input_shape), tuple(rows), total_params, by_kind)


def parse_input_shape(text: str) -> tuple[int, int, int, int]:
    """``"1x3x288x512"`` -> (1, 3, 288, 512). Raises InvalidInputError on any other rank."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError as exc:
        raise InvalidInputError(f"input shape {text!r} is not NxCxHxW integers") from exc
    if len(dims) != 4:
        raise InvalidInputError(f"input shape {text!r} has rank {len(dims)}; expected 4 (NxCxHxW)")
    if any(d <= 0 for d in dims):
        raise InvalidInputError(f"input shape {text!r} has a non-positive dimension")
    return dims


def load_model_spec(spec: str) -> nn.Module:
    """An ``nn.Module`` from a checkpoint path or an import path ``module:factory``.

    ``factory`` is called without arguments (a class or a function).
    """
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".ckpt") or path.exists():
        from build_engine.pruned_checkpoint import load_any_checkpoint  # plain or pruned checkpoints

        if not path.is_file():
            raise ModelError(f"{spec}: no such checkpoint")
        model, _ = load_any_checkpoint(path)
        return model
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"model spec {spec!r} is neither an existing checkpoint nor 'module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model spec {spec!r}: cannot import {module_name!r}: {exc}") from exc
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ConfigError(f"model spec {spec!r}: {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"model spec {spec!r}: {attr!r} is not callable")
    try:
        model = factory()
    except Exception as exc:
        raise ModelError(f"model spec {spec!r}: calling {attr}() failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model spec {spec!r}: {attr}() returned {type(model).__name__}, not an nn.Module")
    return model


def two_stage_macs(model: Any, prof: Any = None) -> int:
    """First stage (backbone, neck, proposal network) as profiled, plus RoIAlign and the box
    head at the test-time maximum number of proposals (``post_nms_test``).

    ``prof``: the model's ``profile_model`` result when the caller has one (else it is made here,
    of the BN-folded model)."""
    if prof is None:
        from build_engine.fold import fold_batchnorm

        folded, _ = fold_batchnorm(model)
        prof = profile_model(folded, (1, 3, model.cfg.input_height, model.cfg.input_width))
    first = sum(r.macs for r in prof.layers if not r.name.startswith("box_head"))
    return int(first + model.second_stage_macs(model.post_nms_test))


def model_macs(model: Any, prof: ProfileResult) -> int:
    """The MACs of one image through ``model``, as the manifest records them, from its
    ``profile.profile_model`` result ``prof`` (batch 1, the model's input size): the per-layer
    profile, except for a two-stage model (one with ``second_stage_macs``). The profile cannot
    count its second stage, whose cost depends on how many proposals the image makes, so it is
    counted at the test-time maximum (``profile.two_stage_macs``), RoIAlign included."""
    return two_stage_macs(model, prof) if hasattr(model, "second_stage_macs") else prof.total_macs
