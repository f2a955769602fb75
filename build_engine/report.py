"""``report.md`` + ``plots/``: the evidence for every step of the build, in one page.

Sections: variants (KPI, latency, parity, gate), MAC profile, quantization (calibration set,
layers kept in FP32, the most sensitive tensors with weight / activation histograms and the
clipping range chosen vs a fixed one), pruning before/after, the scaling table, provenance.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from perception.manifest import Manifest, PreprocessSpec

if TYPE_CHECKING:
    from build_engine.calibration import ChosenRange

log = logging.getLogger(__name__)

# Fixed activation range to compare the calibrated one against: the ReLU6 clip MobileNets
# hard-wire, the classic "range chosen without looking at the data".
FIXED_RANGE = 6.0
SENSITIVE_SHOWN = 4


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def variants_table(manifest: Manifest, root: Path) -> str:
    ref = manifest.variant("fp32")
    lines = [
        "| variant | precision | file MB | MACs | params | mAP50-95 | mAP50 | P | R | p50 ms | p95 ms | min ms | "
        "vs fp32 (p50 / min) | vanished | moved | appeared | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in manifest.variants:
        f = root / v.file
        size = f.stat().st_size / 1e6 if f.is_file() else float("nan")
        m, lat, par = v.metrics, v.latency_ms, v.parity
        ratio = lat.get("p50", float("nan")) / max(ref.latency_ms.get("p50", float("nan")), 1e-9)
        ratio_min = lat.get("min", float("nan")) / max(ref.latency_ms.get("min", float("nan")), 1e-9)
        gate = ("PASS" if v.gate.get("passed") else "**FAIL**") + f": {v.gate.get('reason', '')}"
        lines.append(
            f"| {v.name}{' (default)' if v.name == manifest.default_variant else ''} | {v.precision} | {size:.2f} | "
            f"{v.macs / 1e6:.1f} M | {v.params / 1e6:.3f} M | {_pct(m.get('map50_95', float('nan')))} | "
            f"{_pct(m.get('map50', float('nan')))} | {_pct(m.get('precision', float('nan')))} | "
            f"{_pct(m.get('recall', float('nan')))} | {lat.get('p50', float('nan')):.2f} | "
            f"{lat.get('p95', float('nan')):.2f} | {lat.get('min', float('nan')):.2f} | "
            f"{ratio:.2f}x / {ratio_min:.2f}x | {_pct(par.get('vanished', 0))} % | "
            f"{_pct(par.get('moved', 0))} % | {_pct(par.get('appeared', 0))} % | {gate} |"
        )
    return "\n".join(lines) + "\n"


def tensorrt_qdq_table(manifest: Manifest) -> str:
    """The INT8 variants' TensorRT Q/DQ twins, as scored here through onnxruntime."""
    rows = [(v, v.tensorrt_qdq) for v in manifest.variants if v.tensorrt_qdq is not None]
    if not rows:
        return ""
    lines = [
        "TensorRT's explicit quantization takes signed INT8 with every zero point 0, so each INT8 variant also "
        "ships a symmetric Q/DQ twin for TensorRT to build from. Scored here through onnxruntime (the same "
        "quantization grid; its CPU speed is not judged); the engine is gated again on the device.",
        "",
        "| INT8 variant | TensorRT Q/DQ file | calibrator | mAP50-95 | vs the variant's | vanished | moved | gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, t in rows:
        m, par = t.metrics, t.parity
        gate = ("PASS" if t.passed else "**FAIL**") + f": {t.gate.get('reason', '')}"
        delta = 100 * (m.get("map50_95", float("nan")) - v.metrics.get("map50_95", float("nan")))
        lines.append(f"| {v.name} | `{t.file}` | {t.calibrator} | {_pct(m.get('map50_95', float('nan')))} | "
                     f"{delta:+.2f} points | {_pct(par.get('vanished', 0))} % | {_pct(par.get('moved', 0))} % | "
                     f"{gate} |")
    return "\n".join(lines) + "\n"


def profile_section(model: Any, pre: PreprocessSpec, top: int = 10) -> str:
    from build_engine.fold import fold_batchnorm
    from build_engine.profile import model_macs, profile_model

    folded, n_folded = fold_batchnorm(model)
    r = profile_model(folded, (1, 3, pre.input_height, pre.input_width))
    macs = model_macs(folded, r)  # a two-stage model's second stage at its proposal maximum, as the manifest counts
    rows = sorted(r.layers, key=lambda x: -x.macs)[:top]
    out = [
        f"Input 1x3x{pre.input_height}x{pre.input_width}, after folding {n_folded} Conv+BN pairs: "
        f"**{macs / 1e6:.1f} M MACs** (multiply-accumulates; = {2 * macs / 1e6:.1f} M FLOPs), "
        f"**{r.total_params / 1e6:.3f} M params**. Convolution MACs count OC x OH x OW x KH x KW x IC / groups.",
        "",
        "| layer | type | MACs | share | params | output |",
        "|---|---|---|---|---|---|",
    ]
    for x in rows:
        out.append(f"| {x.name} | {x.type} | {x.macs / 1e6:.2f} M | {100 * x.macs / max(macs, 1):.1f} % | "
                   f"{x.params} | {'x'.join(map(str, x.output_shape))} |")
    return "\n".join(out) + "\n"


class _ActivationRow(NamedTuple):
    """One quantized activation: its SQNR (dB) with the chosen, a fixed and the min-max range."""

    sqnr_chosen: float
    sqnr_fixed: float
    sqnr_minmax: float
    name: str
    chosen: ChosenRange
    fixed: tuple[float, float]
    values: NDArray[np.float32]


class _WeightRow(NamedTuple):
    """One quantized weight: its SQNR (dB) with per-channel and with one per-tensor range."""

    sqnr_per_channel: float
    sqnr_per_tensor: float
    name: str
    chosen: ChosenRange
    values: NDArray[np.float64]


def quant_section(root: Path, manifest: Manifest, calib: Sequence[Path], pre: PreprocessSpec) -> str:
    """Sensitivity of the INT8 variant's tensors + histogram plots of the worst ones."""
    from build_engine.calibration import collect_tensors, fake_quant, iter_batches, qdq_ranges, sqnr_db

    names = [v.name for v in manifest.variants]
    if "int8" not in names:
        return "No INT8 variant was built.\n"
    v8 = manifest.variant("int8")
    calib_info = manifest.provenance.get("calibration", {})
    ranges = qdq_ranges(root / v8.file)
    acts = {k: r for k, r in ranges.items() if r.kind == "activation" and k != "images"}
    weights = {k: r for k, r in ranges.items() if r.kind == "weight"}
    batches = list(iter_batches(list(calib[:4]), pre))
    values = collect_tensors(root / manifest.variant("fp32").file, list(acts), batches)
    rows: list[_ActivationRow] = []
    for name, r in acts.items():
        x = values.get(name)
        if x is None or x.size == 0:
            continue
        fixed = (0.0, FIXED_RANGE) if x.min() >= 0 else (-FIXED_RANGE, FIXED_RANGE)
        rows.append(_ActivationRow(sqnr_db(x, fake_quant(x, r.lo, r.hi)), sqnr_db(x, fake_quant(x, *fixed)),
                                   sqnr_db(x, fake_quant(x, float(x.min()), float(x.max()))), name, r, fixed, x))
    rows.sort(key=lambda t: t[0])
    wrows: list[_WeightRow] = []
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx.load(str(root / manifest.variant("fp32").file)).graph.initializer}
    for name, r in weights.items():
        if name not in inits:
            continue
        w = numpy_helper.to_array(inits[name]).astype(np.float64)
        per_ch = np.concatenate([fake_quant(w[c], -127 * s, 127 * s, 255).reshape(-1) for c, s in enumerate(r.scales)])
        amax = float(np.abs(w).max())
        per_t = fake_quant(w, -amax, amax, 255).reshape(-1)
        wrows.append(_WeightRow(sqnr_db(w.reshape(-1), per_ch), sqnr_db(w.reshape(-1), per_t), name, r, w.reshape(-1)))
    wrows.sort(key=lambda t: t[0])
    plots = _histograms(root / "plots", rows[:SENSITIVE_SHOWN], wrows[:SENSITIVE_SHOWN])
    fp32_nodes = v8.calibration.fp32_nodes if v8.calibration is not None else ()
    out = [
        "INT8 as explicit Q/DQ ONNX: per-channel symmetric INT8 weights, asymmetric **U8** activations "
        "(S8 activations make SiLU / Hardswish models about 2x slower than FP32 on this CPU: docs/performance.md). "
        f"Calibrator **{calib_info.get('calibrator')}** on {len(calib_info.get('images', []))} real images "
        f"through the serving pre-processing; calibration set sha256 `{calib_info.get('sha256', '')}` "
        "(the image list is in the manifest).",
        "",
        f"Kept in FP32 ({len(fp32_nodes)} nodes): the head's prediction convs and the box decode after them "
        f"(8 bits over a {pre.input_width}-px coordinate range is a {pre.input_width / 255:.1f}-px step).",
        "",
        "Most sensitive activations (lowest signal-to-quantization-noise ratio with the chosen range; higher dB is "
        f"better). *fixed* = a range chosen without data ([0, {FIXED_RANGE:g}] or [-{FIXED_RANGE:g}, {FIXED_RANGE:g}], "
        "the ReLU6 clip); *min-max* = the full observed range of these samples.",
        "",
        "| tensor | chosen range | SQNR chosen (dB) | SQNR fixed (dB) | SQNR min-max (dB) |",
        "|---|---|---|---|---|",
    ]
    for s_c, s_f, s_m, name, r, _, _ in rows[:8]:
        out.append(f"| `{name}` | [{r.lo:.3f}, {r.hi:.3f}] | {s_c:.1f} | {s_f:.1f} | {s_m:.1f} |")
    if rows:
        columns = ([t.sqnr_chosen for t in rows], [t.sqnr_fixed for t in rows], [t.sqnr_minmax for t in rows])
        med = [np.median([s for s in col if np.isfinite(s)]) for col in columns]
        out += ["", f"Median over all {len(rows)} quantized activations: chosen {med[0]:.1f} dB, "
                    f"fixed {med[1]:.1f} dB, min-max {med[2]:.1f} dB."]
    out += ["", "Most sensitive weights (per-channel vs one per-tensor range):", "",
            "| weight | SQNR per-channel (dB) | SQNR per-tensor (dB) |", "|---|---|---|"]
    for s_c, s_t, name, _, _ in wrows[:6]:
        out.append(f"| `{name}` | {s_c:.1f} | {s_t:.1f} |")
    out += [""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    return "\n".join(out) + "\n"


def _histograms(plot_dir: Path, acts: list[_ActivationRow], weights: list[_WeightRow]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if acts:
        fig, axes = plt.subplots(1, len(acts), figsize=(4.2 * len(acts), 3.4), squeeze=False)
        for ax, (s_c, s_f, _, name, r, fixed, x) in zip(axes[0], acts, strict=True):
            ax.hist(x, bins=120, color="0.55", log=True)
            ax.axvspan(r.lo, r.hi, color="tab:green", alpha=0.15, label=f"chosen [{r.lo:.2f}, {r.hi:.2f}] {s_c:.0f} dB")
            for b in fixed:
                ax.axvline(b, color="tab:red", ls="--")
            ax.plot([], [], color="tab:red", ls="--", label=f"fixed [{fixed[0]:g}, {fixed[1]:g}] {s_f:.0f} dB")
            ax.set_title(name[-38:], fontsize=8)
            ax.legend(fontsize=7)
        fig.suptitle("activation histograms of the most sensitive tensors (log count)")
        fig.tight_layout()
        paths.append(plot_dir / "activation_histograms.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    if weights:
        fig, axes = plt.subplots(1, len(weights), figsize=(4.2 * len(weights), 3.4), squeeze=False)
        for ax, (s_c, s_t, name, r, w) in zip(axes[0], weights, strict=True):
            ax.hist(w, bins=120, color="0.55", log=True)
            lo_ch, hi_ch = 127 * min(r.scales), 127 * max(r.scales)
            ax.axvspan(-hi_ch, hi_ch, color="tab:green", alpha=0.1,
                       label=f"per-channel ranges +-[{lo_ch:.2f}..{hi_ch:.2f}]")
            ax.axvline(-lo_ch, color="tab:green")
            ax.axvline(lo_ch, color="tab:green")
            ax.set_title(f"{name[-34:]}\nSQNR {s_c:.0f} dB per-channel, {s_t:.0f} dB per-tensor", fontsize=8)
            ax.legend(fontsize=7)
        fig.suptitle("weight histograms of the most sensitive convolutions (log count)")
        fig.tight_layout()
        paths.append(plot_dir / "weight_histograms.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


def tradeoff_plot(root: Path, manifest: Manifest) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (root / "plots").mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for v in manifest.variants:
        if "p50" in v.latency_ms and "map50_95" in v.metrics:
            ax.scatter(v.latency_ms["p50"], 100 * v.metrics["map50_95"],
                       color="tab:green" if v.gate.get("passed") else "tab:red")
            ax.annotate(v.name, (v.latency_ms["p50"], 100 * v.metrics["map50_95"]), fontsize=8)
    ax.set_xlabel("batch-1 latency p50 on this CPU (ms)")
    ax.set_ylabel("mAP50-95 (points)")
    ax.set_title("variants: accuracy vs latency (red = failed gate)")
    fig.tight_layout()
    path = root / "plots" / "variants.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(
    root: Path,
    manifest: Manifest,
    sections: dict[str, str],
    calib: Sequence[Path],
    pre: PreprocessSpec,
    model: Any,
    progress: Callable[[str], None] = lambda _: None,
) -> Path:
    """Write ``root/report.md`` (+ ``root/plots/``); ``sections`` adds titled markdown blocks
    (pruning, scaling) computed by the caller."""
    tradeoff_plot(root, manifest)
    progress("report: quantization sensitivity")
    chosen = ("the fastest that passed its gate" if manifest.variant().passed
              else "no variant passed its gate: the fastest of all")
    parts = [
        f"# Build report: {manifest.name} {manifest.version}",
        "",
        f"Classes: {', '.join(manifest.classes)}. Input {pre.input_width}x{pre.input_height} letterboxed "
        f"{pre.color_order}, scale {pre.scale:.6f}. Default variant: **{manifest.default_variant}** "
        f"({chosen}). Gates (max mAP50-95 drop vs FP32, points): "
        f"{manifest.extra.get('gates_points', {})}; latency (max min-latency ratio vs FP32, optional p95 budget): "
        f"{manifest.extra.get('gates_latency', {})}. Every variant was run through the server's own frame pipeline "
        f"(server.pipeline.FramePipeline: the served decode, letterbox, runtime and NMS) on "
        f"{manifest.provenance.get('val_set', {}).get('images')} "
        f"val images; P/R and parity at the deployed threshold {manifest.postprocess.score_threshold}.",
        "",
        "## Variants",
        "",
        variants_table(manifest, root),
        "Parity vs FP32 at the deployed threshold: *vanished* = FP32 detections with no same-class match "
        "(IoU >= 0.5), *moved* = matched below IoU 0.9, *appeared* = new detections (share of the variant's).",
        "",
        "![variants](plots/variants.png)",
        "",
        *(["## TensorRT INT8 models", "", trt] if (trt := tensorrt_qdq_table(manifest)) else []),
        "## MAC profile (deployed graph)",
        "",
        profile_section(model, pre),
        "## Quantization",
        "",
        quant_section(root, manifest, calib, pre),
    ]
    for title, body in sections.items():
        parts += [f"## {title}", "", body]
    prov = manifest.provenance
    parts += ["## Provenance", "", f"- git sha: `{prov.get('git_sha')}`", f"- built at: {prov.get('built_at')}",
              f"- checkpoint: `{prov.get('checkpoint', {}).get('file')}` "
              f"sha256 `{prov.get('checkpoint', {}).get('sha256')}`",
              f"- libraries: {prov.get('libraries')}", f"- host: {prov.get('host')}", ""]
    path = root / "report.md"
    path.write_text("\n".join(parts))
    return path


def _first_pruning(info: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint pruned in several passes keeps the earlier passes under ``previous``."""
    while isinstance(info.get("previous"), dict):
        info = info["previous"]
    return info


def pruning_section(manifest: Manifest) -> str:
    """Before / after table for every pruned variant against its unpruned counterpart."""
    names = {v.name: v for v in manifest.variants}
    rows = ["| variant | vs | MACs | params | latency p50 / min | mAP50-95 | removed blocks | conv channels |",
            "|---|---|---|---|---|---|---|---|"]
    notes = []
    for v in manifest.variants:
        if v.family == "base":
            continue
        base = manifest.sibling(manifest.variant("fp32"), v.precision, v.format) if "fp32" in names else None
        if base is None:
            continue
        info = v.weights.pruning if v.weights is not None else {}
        first = _first_pruning(info)
        r50 = v.latency_ms.get("p50", float("nan")) / max(base.latency_ms.get("p50", float("nan")), 1e-9)
        rmin = v.latency_ms.get("min", float("nan")) / max(base.latency_ms.get("min", float("nan")), 1e-9)
        drop = 100 * (base.metrics.get("map50_95", 0) - v.metrics.get("map50_95", 0))
        rows.append(
            f"| {v.name} | {base.name} | "
            f"{v.macs / 1e6:.1f} M vs {base.macs / 1e6:.1f} M ({v.macs / max(base.macs, 1):.2f}x) | "
            f"{v.params / 1e6:.3f} M vs {base.params / 1e6:.3f} M ({v.params / max(base.params, 1):.2f}x) | "
            f"{v.latency_ms.get('p50', float('nan')):.2f} / {v.latency_ms.get('min', float('nan')):.2f} ms "
            f"({r50:.2f}x / {rmin:.2f}x) | {_pct(v.metrics.get('map50_95', 0))} ({drop:+.2f} points drop) | "
            f"{len(info.get('removed_blocks', []))} | "
            f"{info.get('channels_after', '?')} of {first.get('channels_before', '?')} |"
        )
        if v.precision == "fp32":
            epochs = info.get("finetune_epochs_total", info.get("finetune_epochs", 0))
            notes.append(f"- {v.name}: {first.get('method', '')}; fine-tuned {epochs} epochs with the training code. "
                         f"Removed blocks: {', '.join(info.get('removed_blocks', [])) or 'none'}.")
    if len(rows) == 2:
        return "No pruned checkpoint was given (`perception prune`, then `perception build --pruned CKPT`).\n"
    return "\n".join(rows + [""] + notes) + "\n"


def build_report(
    root: Path,
    manifest: Manifest,
    model: Any,
    valset: Any,
    calib: Sequence[Path],
    pre: PreprocessSpec,
    post: Any,
    scaling_runs: int,
    scaling_val_images: int,
    threads: int,
    progress: Callable[[str], None] = lambda _: None,
) -> Path:
    """The build's report: pruning and (``scaling_runs`` > 0) scaling sections, then
    ``write_report``. The scaling rows are also written to ``scaling.json`` beside the report
    (the manifest is written once, by the build, and never edited afterwards)."""
    import dataclasses

    from build_engine import gate as g
    from build_engine.scaling import markdown_table, scaling_table

    sections = {"Pruning": pruning_section(manifest)}
    if scaling_runs > 0:
        sub = dataclasses.replace(valset, images=valset.images[:scaling_val_images])
        keep = {i for i, _ in sub.images}
        sub = dataclasses.replace(sub, gt={**sub.gt, "images": [im for im in sub.gt["images"] if im["id"] in keep],
                                           "annotations": [a for a in sub.gt["annotations"] if a["image_id"] in keep]})

        def score(path: Path, w: int, h: int) -> float:
            spec = dataclasses.replace(pre, input_width=w, input_height=h)
            return g.evaluate_variant("scaling", path, sub, spec, post, threads=threads).metrics["map50_95"]

        def quantize(src: Path, out: Path) -> Path:
            from build_engine.calibration import ImageCalibrationReader
            from build_engine.quantize import quantize_int8

            return quantize_int8(src, out, ImageCalibrationReader(list(calib[:16]), pre), "minmax").path

        rows = scaling_table(model, score, runs=scaling_runs, threads=threads, progress=progress, quantize=quantize)
        sections["Scaling (light architecture)"] = (
            "Latency: FP32 onnxruntime, batch 1, this CPU, all rows timed round-robin (p50). INT8/FP32: the same "
            "architecture quantized (min-max, 16 calibration images), ratio of the least-disturbed runs; INT8 pays "
            "off with channel width, so the width knob decides whether quantization is worth it. mAP50-95: the trained "
            f"checkpoint's weights at each input size on the first {len(sub.images)} val images (the variants table "
            f"uses all {len(valset.images)}).\n\n" + markdown_table(rows, manifest.variant("fp32").macs)
        )
        (root / "scaling.json").write_text(json.dumps([r.to_dict() for r in rows], indent=1) + "\n")
    progress("writing report.md and plots/")
    return write_report(root, manifest, sections, calib, pre, model, progress)
