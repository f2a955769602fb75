"""``perception compare A.jsonl B.jsonl [--gt GT.json [--model-classes M]] [--iou 0.5]``: what changes on the same
drive when engine A is replaced by engine B — per-frame detection diff and KPI side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from perception.errors import ConfigError

KPI_KEYS = ("map50_95", "map50", "precision", "recall", "f1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perception compare",
        description="Diff two replays of the same drive frame by frame, with KPI side by side.",
    )
    p.add_argument("a", type=Path, help="replay JSONL of engine A (the baseline)")
    p.add_argument("b", type=Path, help="replay JSONL of engine B (the candidate)")
    p.add_argument("--gt", type=Path, help="COCO ground truth: also score both runs")
    p.add_argument(
        "--iou", type=float, default=0.5, help="IoU at or above which a same-class pair is unchanged (default 0.5)"
    )
    p.add_argument(
        "--pair-iou", type=float, default=0.1, help="lowest IoU at which two detections are paired (default 0.1)"
    )
    p.add_argument("--model-classes", type=Path, metavar="FILE",
                   help="with --gt: the class list of the model that answered (its manifest.json or directory, "
                        "used only for a run that model answered, or a text file of one name per line), as a "
                        "live replay reads it from the server; it decides whether classes are matched to "
                        "categories by name or by class id")
    p.add_argument("--kpi-score-threshold", type=float, default=0.25, help="score threshold for precision / recall")
    p.add_argument("--json", action="store_true",
                   help="print the full report (per-frame diffs) as JSON instead of a table")
    p.add_argument("--json-out", type=Path, metavar="FILE", help="also write the full report as JSON to FILE")
    p.add_argument("--top", type=int, default=10, help="list this many most-changed frames (default 10)")
    return p


def _fmt_table(report: dict[str, Any], a: str, b: str, top: list[dict[str, Any]]) -> str:
    t = report["totals"]
    lines = [
        f"frames compared {report['frames_compared']}  changed {report['frames_changed']}  "
        f"only in A {report['frames_only_in_a']}  only in B {report['frames_only_in_b']}",
        f"detections A {t['detections_a']}  B {t['detections_b']}  unchanged {t['unchanged']}  "
        f"appeared {t['appeared']}  vanished {t['vanished']}  moved {t['moved']}  "
        f"class changed {t['class_changed']}  status changed {t['status_changed']}",
        "",
        f"{'':<22}{'A':>12}{'B':>12}{'B - A':>12}",
    ]
    for k in ("p50", "p95", "p99"):
        va, vb = report["latency_ms"]["a"][k], report["latency_ms"]["b"][k]
        lines.append(f"{'latency ' + k + ' (ms)':<22}{va:>12.2f}{vb:>12.2f}{vb - va:>+12.2f}")
    kpi = report.get("kpi")
    if kpi:
        for k in KPI_KEYS:
            if k in kpi["a"] and k in kpi["b"]:
                va, vb = float(kpi["a"][k]), float(kpi["b"][k])
                lines.append(f"{k:<22}{va:>12.4f}{vb:>12.4f}{vb - va:>+12.4f}")
    if top:
        lines += ["", "most changed frames:"]
        for d in top:
            lines.append(
                f"  {d['camera_id']}#{d['sequence']}: +{len(d['appeared'])} appeared, -{len(d['vanished'])} vanished, "
                f"{len(d['moved'])} moved, {len(d['class_changed'])} class changed"
                + (f", status {d['status']['a']} -> {d['status']['b']}" if "status" in d else "")
            )
    return "\n".join(lines)


def _model_classes(path: Path) -> tuple[tuple[str, ...], str]:
    """(classes, version) of a model's manifest.json or directory, or (classes, "") of a text
    file of one name per line."""
    if path.is_dir() or path.suffix.lower() == ".json":
        from perception.errors import PerceptionError
        from perception.manifest import load_manifest

        try:
            manifest = load_manifest(path, verify_checksums=False)
        except PerceptionError as exc:
            raise ConfigError(f"--model-classes {path}: {exc}") from exc
        return manifest.classes, manifest.version
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--model-classes {path}: cannot read it: {exc}") from exc
    if not names:
        raise ConfigError(f"--model-classes {path}: no class name in it")
    return names, ""


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 < args.iou <= 1.0 or not 0.0 < args.pair_iou <= args.iou:
        raise ConfigError("need 0 < --pair-iou <= --iou <= 1")
    if args.model_classes and not args.gt:
        raise ConfigError("--model-classes needs --gt: it decides how the runs are scored against it")
    from client.compare import compare_runs
    from client.evaluation import classes_of_answers, evaluate_replay
    from client.ground_truth import GroundTruthIndex
    from client.sinks.atomic_json import write_json_atomic
    from client.sinks.jsonl import load_results

    ra, rb = load_results(args.a), load_results(args.b)
    rep = compare_runs(ra, rb, args.iou, args.pair_iou)
    report = rep.as_dict()
    if args.gt:
        gt = GroundTruthIndex.load(args.gt)
        classes, version = _model_classes(args.model_classes) if args.model_classes else ((), "")
        report["kpi"] = {  # each run with the list only if that model answered it (a manifest says which)
            side: evaluate_replay(run, gt, args.kpi_score_threshold, model_classes=classes_of_answers(
                run, classes, version, f"given by --model-classes (for run {side.upper()})"))
            for side, run in (("a", ra), ("b", rb))
        }
    ranked = sorted((d for d in rep.diffs if d.changes), key=lambda d: -d.changes)[: max(0, args.top)]
    if args.json_out:
        write_json_atomic(args.json_out, report)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(_fmt_table(report, str(args.a), str(args.b), [d.as_dict() for d in ranked]))
    return 0

