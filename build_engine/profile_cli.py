"""``perception profile``: MACs and params per layer of a checkpoint or any ``module:factory``."""

from __future__ import annotations

import argparse
import json
import sys


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
    from build_engine.profile import load_model_spec, parse_input_shape, profile_model

    shape = parse_input_shape(args.input)  # validate before importing / loading anything heavy
    model = load_model_spec(args.model)
    if args.fold_bn:
        from build_engine.fold import fold_batchnorm

        model, _ = fold_batchnorm(model)
    result = profile_model(model, shape)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
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
        f"\ninput {'x'.join(map(str, shape))}: total {_fmt(result.total_macs)} MACs "
        f"(= {_fmt(result.total_flops)} FLOPs; conv+linear {_fmt(result.conv_linear_macs)} MACs), "
        f"{_fmt(result.total_params)} params ({result.total_params:,})"
    )
    return 0
