"""Weights-only checkpoints: a state dict plus plain-data metadata, loadable with
``torch.load(weights_only=True)`` (no pickled classes, so loading cannot run code).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from build_engine.model import ModelConfig, build_model
from build_engine.model.config import DEFAULT_CLASSES
from perception.errors import ConfigError, ModelError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself. All fields are plain data (JSON-compatible)."""

    model_config: dict[str, Any]
    classes: tuple[str, ...] = DEFAULT_CLASSES
    input_size: tuple[int, int] = (512, 288)  # (width, height)
    epoch: int = 0
    val_kpi: dict[str, float] = field(default_factory=dict)
    train_config_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["classes"] = tuple(d.get("classes", DEFAULT_CLASSES))
        d["input_size"] = tuple(d.get("input_size", (512, 288)))
        return cls(**d)

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(dict(self.model_config))


def meta_for(model: nn.Module, classes: tuple[str, ...] = DEFAULT_CLASSES, **kw: Any) -> CheckpointMeta:
    """Metadata for a ``Detector`` (reads its ``cfg``)."""
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]  # nn.Module types unknown attributes as Tensor | Module
    return CheckpointMeta(
        model_config=cfg.to_dict(), classes=tuple(classes), input_size=(cfg.input_width, cfg.input_height), **kw
    )


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    meta: CheckpointMeta,
    extra_state: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write weights (+ optional tensors-only training state, e.g. optimizer) atomically.

    half: store floating-point tensors as FP16 (half the file; for shipped weights). Loading
    always yields FP32 tensors (``load_payload``).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "meta": meta.to_dict(),
        "state_dict": state,
    }
    if extra_state:
        payload["train_state"] = extra_state
    fd, tmp = tempfile.mkstemp(prefix=".ckpt.", suffix=".pt", dir=p.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a shipped file must be readable by the server user
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def load_payload(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw checkpoint dict; ModelError naming the file if it is missing or corrupt."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such checkpoint file")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle / zip / runtime errors for corrupt files
        raise ModelError(f"{p}: not a readable weights-only checkpoint ({type(exc).__name__})") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or "meta" not in payload:
        raise ModelError(f"{p}: checkpoint lacks 'state_dict'/'meta' (not written by save_checkpoint)")
    state = payload["state_dict"]
    if isinstance(state, dict):  # weights stored in FP16 (save_checkpoint(half=True)) load as FP32
        payload["state_dict"] = {k: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.float16 else v
                                 for k, v in state.items()}
    return payload


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the detector from the checkpoint's config, load its weights; eval mode."""
    p = Path(path)
    payload = load_payload(p)
    try:
        meta = CheckpointMeta.from_dict(payload["meta"])
        model = build_model(meta.config)
        model.load_state_dict(payload["state_dict"])
    except (ConfigError, RuntimeError, TypeError, KeyError) as exc:
        raise ModelError(f"{p}: checkpoint does not match its model config: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, meta
