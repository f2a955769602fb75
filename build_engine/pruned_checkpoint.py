"""Loading a checkpoint that may be pruned: rebuild the architecture from its config, remove
the blocks pruning removed, resize every layer to the saved tensor shapes, load the weights.

Apart from ``build_engine.prune`` so that everything that only reads checkpoints (evaluation,
profiling, the build) does not depend on the pruning and fine-tuning code.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from perception.errors import ModelError

if TYPE_CHECKING:
    from build_engine.checkpoint import CheckpointMeta


def _resize_to_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every Conv / BN / Linear the tensor shapes found in ``state`` (a pruned state dict)."""
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        w = state.get(prefix + "weight")
        if isinstance(m, nn.Conv2d) and w is not None and tuple(w.shape) != tuple(m.weight.shape):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            m.out_channels = int(w.shape[0])
            m.groups = m.out_channels if depthwise else m.groups
            m.in_channels = int(w.shape[1]) * m.groups
            m.weight = nn.Parameter(torch.empty_like(w))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_channels))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            rm = state.get(prefix + "running_mean")
            n = int(rm.shape[0]) if rm is not None else (int(w.shape[0]) if w is not None else m.num_features)
            if n != m.num_features:
                m.num_features = n
                if m.weight is not None:
                    m.weight = nn.Parameter(torch.ones(n))
                    m.bias = nn.Parameter(torch.zeros(n))
                m.register_buffer("running_mean", torch.zeros(n))
                m.register_buffer("running_var", torch.ones(n))
        elif isinstance(m, nn.Linear) and w is not None and tuple(w.shape) != tuple(m.weight.shape):
            m.out_features, m.in_features = int(w.shape[0]), int(w.shape[1])
            m.weight = nn.Parameter(torch.empty_like(w))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_features))


def remove_blocks(model: nn.Module, names: list[str]) -> None:
    """Delete the named submodules from their parent ``nn.Sequential`` (keys are kept, so the
    state-dict names of the remaining blocks do not change)."""
    for name in names:
        parent_name, _, key = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not isinstance(parent, nn.Sequential) or key not in parent._modules:
            raise ModelError(f"cannot remove block {name!r}: not an element of an nn.Sequential")
        del parent._modules[key]


def load_any_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, CheckpointMeta]:
    """``load_checkpoint`` that also understands pruned checkpoints; eval mode."""
    from build_engine.checkpoint import CheckpointMeta, load_checkpoint, load_payload
    from build_engine.model import build_model

    payload = load_payload(path)
    meta_d = payload.get("meta", {})
    pruned = (meta_d.get("extra") or {}).get("pruned") if isinstance(meta_d, dict) else None
    if not pruned:
        return load_checkpoint(path)
    try:
        meta = CheckpointMeta.from_dict(meta_d)
        model = build_model(meta.config)
        remove_blocks(model, list(pruned.get("removed_blocks", [])))
        _resize_to_state(model, payload["state_dict"])
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, KeyError, ValueError) as exc:
        raise ModelError(f"{path}: pruned checkpoint does not match its config: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, meta
