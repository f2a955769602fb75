"""PNG plots of a KpiReport: PR curves (IoU 0.5, per class), F1 / P / R vs confidence, and the
confusion matrix. matplotlib with the non-interactive Agg backend, imported lazily."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from perception.kpi import RECALL_THRESHOLDS, KpiReport


def _use_agg() -> None:
    """Select the non-interactive Agg backend; call before importing ``matplotlib.pyplot``."""
    import matplotlib

    matplotlib.use("Agg")


def plot_pr_curve(report: KpiReport, path: Path) -> Path:
    _use_agg()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    for name, prec in report.pr_curves.items():
        ap = report.per_class.get(name, {}).get("ap50", 0.0)
        ax.plot(RECALL_THRESHOLDS, prec, label=f"{name} {ap:.3f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"PR curve @IoU0.5, mAP50 {report.map50:.3f}")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_f1_confidence(report: KpiReport, path: Path) -> Path:
    _use_agg()
    import matplotlib.pyplot as plt

    c = report.f1_curve
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    ax.plot(c["threshold"], c["f1"], label="F1")
    ax.plot(c["threshold"], c["precision"], label="precision", alpha=0.7)
    ax.plot(c["threshold"], c["recall"], label="recall", alpha=0.7)
    ax.axvline(report.score_threshold, color="k", ls="--", lw=0.8, label=f"deployed {report.score_threshold:.2f}")
    ax.set(xlabel="score threshold", ylabel="value", xlim=(0, 1), ylim=(0, 1.02),
           title=f"best F1 at {report.best_f1_threshold:.2f}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(report: KpiReport, path: Path) -> Path:
    _use_agg()
    import matplotlib.pyplot as plt

    cm = np.asarray(report.confusion, np.float64)
    labels = list(report.classes) + ["background"]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set(xlabel="predicted", ylabel="ground truth", title=f"confusion @IoU0.5, score >= {report.score_threshold:.2f}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(report: KpiReport, out_dir: Path) -> list[Path]:
    """pr_curve.png, f1_confidence.png, confusion_matrix.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_pr_curve(report, out_dir / "pr_curve.png"),
        plot_f1_confidence(report, out_dir / "f1_confidence.png"),
        plot_confusion(report, out_dir / "confusion_matrix.png"),
    ]


def plot_training_curves(log_path: Path, path: Path) -> Path:
    """Loss terms and validation mAP per epoch from a run's ``train_log.jsonl``: two panels,
    so a diverging loss or a stalled mAP shows at a glance."""
    import json

    _use_agg()
    import matplotlib.pyplot as plt

    hist = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    epochs = [h["epoch"] for h in hist]
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    names = sorted({k for h in hist for k, v in h.items()
                    if k.startswith("loss_") and not k.startswith("loss_num") and v > 0})  # log axis: no all-zero terms
    for name in names:
        ax_loss.plot(epochs, [h.get(name, float("nan")) for h in hist], marker=".", label=name[5:])
    ax_loss.set(xlabel="epoch", ylabel="training loss (epoch mean)", yscale="log", title="loss")
    ax_loss.legend(fontsize=7)
    ax_loss.grid(alpha=0.3)
    for key in ("map50", "map50_95"):
        pts = [(h["epoch"], h["val"][key]) for h in hist if key in h.get("val", {})]
        if pts:
            ax_map.plot(*zip(*pts, strict=True), marker="o", label=f"val {key}")
    ax_map.set(xlabel="epoch", ylabel="mAP", ylim=(0, 1), title="validation")
    ax_map.legend(fontsize=8)
    ax_map.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
