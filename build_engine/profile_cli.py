"""``perception profile``: MACs and params per layer of a checkpoint or any ``module:factory``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perception profile",
        description="Count MACs (multiply-accumulates; FLOPs = 2 x MACs) and parameters per layer.",
    )
    p.add_argument("--model", required=True, help="a checkpoint file, or an import path 'package.module:factory'")
    p.add_argument("--input", required=True, help="input shape NxCxHxW, e.g. 1x3x288x512")
    p.add_argument("--json", action="store_true", help="print the full profile as JSON")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into convolutions first (as deployed)")
    p.add_argument("--top", type=int, default=0, help="table: only the N layers with the most MACs")
    return p


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from build_engine.profile import load_model_spec, model_macs, parse_input_shape, profile_model
    from perception.errors import ConfigError

    shape = parse_input_shape(args.input)  # validate before importing / loading anything heavy
    model = load_model_spec(args.model)
    note = ""
    if hasattr(model, "second_stage_macs"):
        # Its total adds the second stage of one image at the model's own input size (model_macs).
        cfg: Any = model.cfg
        own = (1, 3, cfg.input_height, cfg.input_width)
        if shape != own:
            raise ConfigError(f"a two-stage model is profiled as one image at its input size: use --input "
                              f"{'x'.join(map(str, own))}")
        note = (f"two-stage: the total counts RoIAlign and the box head at {model.post_nms_test} proposals (the "
                "test-time maximum, as the manifest does); the box_head rows only the proposals of an all-zeros input")
    if args.fold_bn:
        from build_engine.fold import fold_batchnorm

        model, _ = fold_batchnorm(model)
    result = profile_model(model, shape)
    total = model_macs(model, result)
    if args.json:
        extra = {"note": note} if note else {}
        json.dump({**result.to_dict(), "total_macs": total, "total_flops": 2 * total, **extra}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    layers = list(result.layers)
    if args.top > 0:
        layers = sorted(layers, key=lambda r: -r.macs)[: args.top]
    width = max([len(r.name) for r in layers] + [5])
    print(f"{'layer':<{width}}  {'type':<16} {'MACs':>10} {'params':>10}  output")
    for r in layers:
        shape_text = "x".join(map(str, r.output_shape))
        print(f"{r.name:<{width}}  {r.type:<16} {_fmt(r.macs):>10} {_fmt(r.params):>10}  {shape_text}")
    print(
        f"\ninput {'x'.join(map(str, shape))}: total {_fmt(total)} MACs "
        f"(= {_fmt(2 * total)} FLOPs; conv+linear {_fmt(result.conv_linear_macs)} MACs), "
        f"{_fmt(result.total_params)} params ({result.total_params:,})"
    )
    if note:
        print(note)
    return 0
