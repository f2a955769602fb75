"""Light architecture: how resolution, depth and width scaling change MACs, params, latency, mAP.

Every row is a real model: built from the family's ``ModelConfig`` with one knob changed,
BN-folded, exported to ONNX and timed batch-1 with onnxruntime on this CPU, all rows
round-robin in one loop (``gate.measure_latency``) so their ratios are comparable.

mAP is only reported where trained weights exist. The detector is fully convolutional, so
the trained checkpoint itself is also scored at other input resolutions (same weights,
different letterbox size) - resolution rows carry a real mAP. Depth / width rows would need
their own training runs; their mAP column says so instead of guessing.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from build_engine.model import ModelConfig

log = logging.getLogger(__name__)

# (label, width, height): camera resolutions down to the family's own sizes. Inputs must be
# multiples of 32 (the largest stride), so 1080 and 720 round up to 1088 and 736.
RESOLUTIONS = (("1920x1080 camera", 1920, 1088), ("1280x720 camera", 1280, 736), ("small-preset input", 640, 384),
               ("edge/nano-preset input", 512, 288), ("pico-preset input", 384, 224))
DEPTHS = (0.33, 0.67, 1.0)
WIDTHS = (0.125, 0.25, 0.5)


@dataclass
class ScalingRow:
    group: str  # "resolution", "depth" or "width"
    label: str
    input_width: int
    input_height: int
    width_mult: float
    depth_mult: float
    macs: int  # as the manifest counts them (profile.model_macs), which "vs deployed" divides by
    params: int
    latency_ms: float = float("nan")
    map50_95: float | None = None
    int8_ratio: float | None = None  # INT8 / FP32 latency (min of runs), width rows only
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def scaling_table(
    model: Any,
    evaluate: Callable[[Path, int, int], float] | None,
    runs: int = 5,
    threads: int = 2,
    progress: Callable[[str], None] = lambda _: None,
    resolutions: tuple[tuple[str, int, int], ...] = RESOLUTIONS,
    depths: tuple[float, ...] = DEPTHS,
    widths: tuple[float, ...] = WIDTHS,
    quantize: Callable[[Path, Path], Path] | None = None,
) -> list[ScalingRow]:
    """Rows for the trained ``model`` (a ``Detector`` with ``.cfg``) and its scaled siblings.

    evaluate(onnx_path, width, height) -> mAP50-95 of the *trained* weights exported at that
    input size, or None to skip mAP entirely. quantize(fp32_onnx, out) -> INT8 ONNX: when
    given, width rows also get their INT8 / FP32 latency ratio (INT8 pays off with width).
    """
    import torch

    from build_engine.export import export_onnx
    from build_engine.fold import fold_batchnorm
    from build_engine.gate import measure_latency
    from build_engine.model import build_model
    from build_engine.profile import model_macs, profile_model

    base = model.cfg
    rows: list[ScalingRow] = []
    paths: dict[str, Path] = {}
    samples: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        specs: list[tuple[str, str, ModelConfig, bool]] = []  # (group, label, config, has the trained weights)
        for label, w, h in resolutions:
            at_size = dataclasses.replace(base, input_width=w, input_height=h)
            specs.append(("resolution", f"{label} ({w}x{h})", at_size, True))
        for d in depths:
            specs.append(("depth", f"depth x{d}", dataclasses.replace(base, depth_mult=d), False))
        for wm in widths:
            specs.append(("width", f"width x{wm}", dataclasses.replace(base, width_mult=wm), False))
        done: dict[tuple[int, int, float, float], str] = {}  # the base model recurs in every group
        for i, (group, label, cfg, trained) in enumerate(specs):
            same_arch = (cfg.depth_mult, cfg.width_mult) == (base.depth_mult, base.width_mult)
            ident = (cfg.input_width, cfg.input_height, cfg.width_mult, cfg.depth_mult)
            if ident in done:
                first = rows[int(done[ident][3:])]
                rows.append(dataclasses.replace(first, group=group, label=label, note=first.note))
            else:
                key = done[ident] = f"row{i}"
                torch.manual_seed(0)
                net = build_model(cfg)  # built for its input size: its decode grid is sized for it
                if trained or same_arch:
                    net.load_state_dict(model.state_dict())  # fully convolutional: same weights, any size
                folded, _ = fold_batchnorm(net)
                prof = profile_model(folded, (1, 3, cfg.input_height, cfg.input_width))
                progress(f"scaling: exporting {label}")
                paths[key] = export_onnx(folded, Path(tmp) / f"{key}.onnx", (cfg.input_height, cfg.input_width))
                input_shape = (1, 3, cfg.input_height, cfg.input_width)
                samples[key] = np.random.default_rng(0).random(input_shape, dtype=np.float32)
                row = ScalingRow(group, label, cfg.input_width, cfg.input_height, cfg.width_mult, cfg.depth_mult,
                                 model_macs(folded, prof), prof.total_params)
                if evaluate is not None and (trained or same_arch):
                    progress(f"scaling: scoring the trained weights at {cfg.input_width}x{cfg.input_height}")
                    row.map50_95 = evaluate(paths[key], cfg.input_width, cfg.input_height)
                elif not (trained or same_arch):
                    row.note = "untrained architecture: mAP needs its own training run"
                rows.append(row)
            key = done[ident]
            if quantize is not None and group == "width" and key + "_int8" not in paths:
                progress(f"scaling: quantizing {label}")
                paths[key + "_int8"] = quantize(paths[key], Path(tmp) / f"{key}.int8.onnx")
                samples[key + "_int8"] = samples[key]
        progress(f"scaling: timing {len(rows)} models round-robin")
        lat = measure_latency(paths, samples, runs, threads)
        for row in rows:
            key = done[(row.input_width, row.input_height, row.width_mult, row.depth_mult)]
            row.latency_ms = lat[key]["p50"]
            if key + "_int8" in lat:
                row.int8_ratio = lat[key + "_int8"]["min"] / lat[key]["min"]
    return rows


def markdown_table(rows: list[ScalingRow], base_macs: int) -> str:
    """The report's scaling table (MACs relative to the deployed model)."""
    head = ("| group | model | input | width x | depth x | MACs | vs deployed | params | latency p50 (ms) "
            "| INT8/FP32 | mAP50-95 |\n")
    head += "|---|---|---|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        m = f"{100 * r.map50_95:.2f}" if r.map50_95 is not None else (r.note or "-")
        lines.append(
            f"| {r.group} | {r.label} | {r.input_width}x{r.input_height} | {r.width_mult} | {r.depth_mult} | "
            f"{r.macs / 1e6:.1f} M | {r.macs / max(base_macs, 1):.2f}x | {r.params / 1e6:.3f} M | "
            f"{r.latency_ms:.2f} | {'-' if r.int8_ratio is None else f'{r.int8_ratio:.2f}x'} | {m} |"
        )
    return head + "\n".join(lines) + "\n"
