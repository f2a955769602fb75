"""The design table: which detector family, at which MAC budget, on this CPU.

One row per design: the three families (YOLO-style anchor-free, SSD-style with priors and a
background class, two-stage R-CNN-style), activations (ReLU, SiLU, Hardswish), width and
resolution scaling. Every row is a real model measured the same way:

- MACs and params of the BN-folded PyTorch model (``build_engine.profile``);
- FP32 and INT8 (onnxruntime QDQ, the build's own quantizer and calibration set) latency,
  batch 1, every row and precision timed round-robin in one loop (``gate.measure_latency``),
  so their ratios are comparable even on a shared machine;
- mAP50 and mAP50-95 of both precisions on the same held-out test set (generated, seed 3),
  through the serving pre/post-processing (``perception.pipeline``), and the INT8 drop.

Weights come from two places, and every row says which: the shipped checkpoints (full
schedule, ``models/<family>/detector.pt``), scored at their own input size and, since every
family here is fully convolutional, at other input sizes too; or a short training run
(``SHORT_SCHEDULE``, the same for every such row) that this module starts itself and caches
under ``OUT/runs/<row>``. A shipped checkpoint that is missing turns its rows into an error
naming the file; no row reports an accuracy it did not measure.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perception.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# The short schedule of every row trained here: 3 epochs over the default's 3500 generated
# training images (warm-up 1 epoch, cosine), scored once at the end, one thread per run so
# two rows can train side by side on 2 cores. Long enough to rank designs, far from converged:
# compare short rows with short rows, shipped rows with shipped rows.
SHORT_SCHEDULE = ("optim.epochs=3", "optim.warmup_epochs=1", "eval_every=3", "threads=1")
SHORT_LABEL = "short: 3 epochs x 3500 images"
TEST_SEED, TEST_IMAGES = 3, 300
CALIB_IMAGES = 48


@dataclass(frozen=True)
class DesignSpec:
    """One row to measure: a shipped checkpoint (optionally at another input size) or a
    short training run of ``config`` with ``overrides``."""

    key: str
    family: str
    label: str
    config: str = ""
    overrides: tuple[str, ...] = ()
    checkpoint: str = ""
    input_size: tuple[int, int] | None = None  # (width, height); None = the checkpoint's own

    @property
    def trained_here(self) -> bool:
        return not self.checkpoint


SPECS: tuple[DesignSpec, ...] = (
    DesignSpec("yolo-edge-relu", "yolo", "YOLO-style edge, ReLU (shipped default)",
               checkpoint="models/default/detector.pt"),
    DesignSpec("yolo-edge-relu@384x224", "yolo", "YOLO-style edge, ReLU, 384x224 input",
               checkpoint="models/default/detector.pt", input_size=(384, 224)),
    DesignSpec("yolo-edge-relu@640x384", "yolo", "YOLO-style edge, ReLU, 640x384 input",
               checkpoint="models/default/detector.pt", input_size=(640, 384)),
    DesignSpec("yolo-edge-relu-pruned", "yolo", "YOLO-style edge, ReLU, pruned + distilled (shipped)",
               checkpoint="models/default/detector_pruned.pt"),
    DesignSpec("yolo-edge-relu-short", "yolo", "YOLO-style edge, ReLU", config="configs/default.yaml"),
    DesignSpec("yolo-edge-silu-short", "yolo", "YOLO-style edge, SiLU", config="configs/default.yaml",
               overrides=("model.act=silu",)),
    DesignSpec("yolo-edge-hardswish-short", "yolo", "YOLO-style edge, Hardswish", config="configs/default.yaml",
               overrides=("model.act=hardswish",)),
    DesignSpec("ssd-edge", "ssd", "SSD-style edge backbone (shipped)", checkpoint="models/ssd/detector.pt"),
    DesignSpec("ssd-edge@384x224", "ssd", "SSD-style edge backbone, 384x224 input",
               checkpoint="models/ssd/detector.pt", input_size=(384, 224)),
    DesignSpec("ssd-edge@640x384", "ssd", "SSD-style edge backbone, 640x384 input",
               checkpoint="models/ssd/detector.pt", input_size=(640, 384)),
    DesignSpec("ssd-edge-short", "ssd", "SSD-style edge backbone", config="configs/ssd.yaml"),
    DesignSpec("rcnn", "rcnn", "Two-stage R-CNN-style (shipped)", checkpoint="models/rcnn/detector.pt"),
    DesignSpec("rcnn@384x224", "rcnn", "Two-stage R-CNN-style, 384x224 input", checkpoint="models/rcnn/detector.pt",
               input_size=(384, 224)),
    DesignSpec("rcnn@640x384", "rcnn", "Two-stage R-CNN-style, 640x384 input", checkpoint="models/rcnn/detector.pt",
               input_size=(640, 384)),
    DesignSpec("rcnn-short", "rcnn", "Two-stage R-CNN-style", config="configs/rcnn.yaml"),
)


@dataclass
class DesignRow:
    key: str
    family: str
    label: str
    schedule: str
    act: str
    width_mult: float
    depth_mult: float
    input_width: int
    input_height: int
    macs: int
    params: int
    fp32_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    int8_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    fp32: dict[str, float] = dataclasses.field(default_factory=dict)
    int8: dict[str, float] = dataclasses.field(default_factory=dict)
    pareto: bool = False

    @property
    def int8_drop(self) -> float:
        return self.fp32.get("map50_95", float("nan")) - self.int8.get("map50_95", float("nan"))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["int8_drop_map50_95"] = self.int8_drop
        return d


def select(keys: Sequence[str] | None) -> tuple[DesignSpec, ...]:
    """The specs named by ``keys`` (all when empty); ConfigError naming an unknown key."""
    if not keys:
        return SPECS
    known = {s.key: s for s in SPECS}
    bad = [k for k in keys if k not in known]
    if bad:
        raise ConfigError(f"unknown design row {bad[0]!r}; known: {', '.join(known)}")
    return tuple(known[k] for k in keys)


def short_config(spec: DesignSpec) -> Any:
    """The TrainConfig of a short-schedule row."""
    from build_engine.config import load_config

    return load_config(REPO_ROOT / spec.config, [*spec.overrides, *SHORT_SCHEDULE])


def train_short(spec: DesignSpec, runs_dir: Path, progress: Callable[[str], None]) -> Path:
    """``runs_dir/<key>/best.pt`` of the row's short run, training it unless a finished run of
    the same config (hash and epoch count) is already there."""
    from build_engine.checkpoint import load_payload
    from build_engine.train.trainer import train

    cfg = short_config(spec)
    out = runs_dir / spec.key
    best = out / "best.pt"
    if best.is_file():
        meta = load_payload(best)["meta"]
        if meta.get("train_config_hash") == cfg.hash() and int(meta.get("epoch", 0)) == cfg.optim.epochs:
            progress(f"{spec.key}: reusing {best}")
            return best
    progress(f"{spec.key}: training ({SHORT_LABEL}, {cfg.threads} thread) into {out}")
    t0 = time.time()
    train(cfg, out, progress=False)
    progress(f"{spec.key}: trained in {(time.time() - t0) / 60:.1f} min")
    return best


def load_row_model(spec: DesignSpec, runs_dir: Path) -> tuple[Any, Any]:
    """(eval-mode model at the row's input size, checkpoint meta)."""
    import dataclasses as dc

    from build_engine.model import build_model
    from build_engine.pruned_checkpoint import load_any_checkpoint

    path = runs_dir / spec.key / "best.pt" if spec.trained_here else REPO_ROOT / spec.checkpoint
    if not path.is_file():
        raise ModelError(f"{path}: missing checkpoint for design row {spec.key!r}"
                         + (" (run `perception design` without --skip-training)" if spec.trained_here else ""))
    model, meta = load_any_checkpoint(path)
    if spec.input_size is not None:
        w, h = spec.input_size
        state = model.state_dict()
        if (meta.extra or {}).get("pruned"):
            raise ConfigError(f"{spec.key}: resizing a pruned checkpoint is not supported")
        model = build_model(dc.replace(meta.config, input_width=w, input_height=h))
        model.load_state_dict(state)  # grids / priors are non-persistent: rebuilt for the new size
        model.eval()
    return model, meta


def measure(
    specs: Sequence[DesignSpec], out_dir: Path, test_dir: Path, calib: Sequence[Path], latency_runs: int = 20,
    threads: int = 2, progress: Callable[[str], None] = lambda _: None,
) -> list[DesignRow]:
    """Export, quantize, score and time every row; the rows in ``specs`` order."""
    from build_engine.build import LoadedModel, export_variant_onnx, postprocess_spec, preprocess_spec
    from build_engine.calibration import ImageCalibrationReader
    from build_engine.gate import ValSet, evaluate_variant, latency_sample, measure_latency
    from build_engine.quantize import quantize_int8

    valset = ValSet.load(test_dir)
    onnx_dir = out_dir / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    rows, paths, samples, batch = [], {}, {}, {}
    for spec in specs:
        model, meta = load_row_model(spec, out_dir / "runs")
        cfg = model.cfg
        lm = LoadedModel(model, tuple(meta.classes), cfg.input_width, cfg.input_height, Path(spec.key), "", {})
        pre, post = preprocess_spec(lm), postprocess_spec(lm)
        progress(f"{spec.key}: exporting FP32 and quantizing INT8 ({len(calib)} calibration images)")
        # A two-stage row's MACs count its second stage at the test-time maximum of proposals.
        fp32, counts = export_variant_onnx(lm, onnx_dir / f"{spec.key}.fp32.onnx")
        int8 = quantize_int8(fp32, onnx_dir / f"{spec.key}.int8.onnx", ImageCalibrationReader(list(calib), pre)).path
        bs = 1 if getattr(model, "export_batch", None) == 1 else 4
        scores = {}
        for prec, path in (("fp32", fp32), ("int8", int8)):
            progress(f"{spec.key}: scoring {prec} on {len(valset.images)} test images")
            m = evaluate_variant(f"{spec.key}-{prec}", path, valset, pre, post, threads=threads, batch_size=bs).metrics
            scores[prec] = {k: m[k] for k in ("map50_95", "map50", "precision", "recall")}
            paths[f"{spec.key}:{prec}"] = path
            samples[f"{spec.key}:{prec}"] = latency_sample(valset, pre, post)
        batch[spec.key] = bs
        schedule = SHORT_LABEL if spec.trained_here else f"shipped: epoch {meta.epoch} of its full schedule"
        rows.append(DesignRow(spec.key, spec.family, spec.label, schedule, cfg.act, cfg.width_mult, cfg.depth_mult,
                              cfg.input_width, cfg.input_height, counts["macs"], counts["params"],
                              fp32=scores["fp32"], int8=scores["int8"]))
    progress(f"timing {len(paths)} models round-robin, batch 1, {latency_runs} runs, {threads} threads")
    lat = measure_latency(paths, samples, runs=latency_runs, threads=threads)
    for r in rows:
        r.fp32_ms, r.int8_ms = lat[f"{r.key}:fp32"], lat[f"{r.key}:int8"]
    mark_pareto(rows)
    return rows


def mark_pareto(rows: list[DesignRow]) -> None:
    """A row is on the front when no other row is at least as fast (INT8 min latency) and at
    least as accurate (INT8 mAP50-95), and strictly better in one of the two."""
    for r in rows:
        x, y = r.int8_ms["min"], r.int8["map50_95"]
        r.pareto = not any(
            (o.int8_ms["min"] <= x and o.int8["map50_95"] >= y) and (o.int8_ms["min"] < x or o.int8["map50_95"] > y)
            for o in rows if o is not r)


def plot(rows: Sequence[DesignRow], path: Path) -> Path:
    """mAP50-95 (INT8) against INT8 latency; filled markers are shipped (full schedule) rows,
    hollow ones short-schedule rows; the line joins the Pareto front."""
    from build_engine.plots import _use_agg

    _use_agg()
    import matplotlib.pyplot as plt

    colours = {"yolo": "tab:blue", "ssd": "tab:orange", "rcnn": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=100)
    for r in rows:
        short = r.schedule == SHORT_LABEL
        ax.scatter(r.int8_ms["min"], r.int8["map50_95"], s=60, marker="o",
                   facecolors="none" if short else colours[r.family], edgecolors=colours[r.family])
        ax.annotate(r.key, (r.int8_ms["min"], r.int8["map50_95"]), fontsize=6, xytext=(4, 3),
                    textcoords="offset points")
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.int8_ms["min"])
    ax.plot([r.int8_ms["min"] for r in front], [r.int8["map50_95"] for r in front], "k--", lw=0.8,
            label="Pareto front")
    for fam, c in colours.items():
        ax.scatter([], [], color=c, label=fam)
    ax.set(xlabel="INT8 latency, batch 1, min of runs (ms)", ylabel="INT8 mAP50-95 (held-out test set)",
           title="Design table: filled = shipped (full schedule), hollow = short schedule")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown(rows: Sequence[DesignRow], meta: dict[str, Any]) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.1f}"

    lines = [
        "# Design table", "",
        f"Written by `perception design` on {meta['host']} ({meta['threads']} onnxruntime threads, batch 1, "
        f"{meta['latency_runs']} runs per model, every model timed round-robin in one loop: compare ratios, "
        "absolute times depend on the CPU).",
        f"Accuracy: the held-out generated test set (seed {TEST_SEED}, {TEST_IMAGES} images 640x360) through the "
        "serving pre/post-processing. INT8: onnxruntime QDQ (U8 activations, per-channel S8 weights), "
        f"calibrated on {meta['calib_images']} generated images (another seed).",
        f"Schedules: *shipped* rows are the trained checkpoints in `models/` (full schedules, see each "
        f"`eval.md`); *short* rows were trained by this command with the same short schedule ({SHORT_LABEL}, "
        "`build_engine/design.py` SHORT_SCHEDULE). Compare short with short and shipped with shipped.",
        "MACs of the BN-folded model; for the two-stage rows, the first stage plus RoIAlign and the box head at "
        "the test-time maximum of 100 proposals (fewer run on most frames).", "",
        "| row | family | act | width / depth | input | MACs | params | FP32 ms (min / p50) | INT8 ms (min / p50) "
        "| INT8 / FP32 | mAP50 FP32 | mAP50-95 FP32 | mAP50 INT8 | mAP50-95 INT8 | INT8 drop (pts) | schedule "
        "| Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.key} | {r.family} | {r.act} | {r.width_mult:g} / {r.depth_mult:g} | "
            f"{r.input_width}x{r.input_height} | {r.macs / 1e6:.0f} M | {r.params / 1e6:.2f} M | "
            f"{r.fp32_ms['min']:.2f} / {r.fp32_ms['p50']:.2f} | {r.int8_ms['min']:.2f} / {r.int8_ms['p50']:.2f} | "
            f"{r.int8_ms['min'] / r.fp32_ms['min']:.2f}x | {pct(r.fp32['map50'])} | {pct(r.fp32['map50_95'])} | "
            f"{pct(r.int8['map50'])} | {pct(r.int8['map50_95'])} | {100 * r.int8_drop:+.1f} | "
            f"{'short' if r.schedule == SHORT_LABEL else 'shipped'} | {'yes' if r.pareto else ''} |")
    lines += ["", "![mAP50-95 against INT8 latency](design.png)", ""]
    return "\n".join(lines)


def write(rows: Sequence[DesignRow], out_dir: Path, meta: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "design.json").write_text(json.dumps({"meta": meta, "short_schedule": list(SHORT_SCHEDULE),
                                                     "rows": [r.to_dict() for r in rows]}, indent=1) + "\n")
    plot(rows, out_dir / "design.png")
    (out_dir / "design.md").write_text(markdown(rows, meta))
    return out_dir / "design.md"
