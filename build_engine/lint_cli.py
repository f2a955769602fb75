"""``perception lint-labels --data DIR [--checkpoint CKPT] [--json | --json-out FILE] [--limit N]``.

Geometric defects always; with a checkpoint, model-assisted mistakes too. Prints a ranked
table; ``--json`` writes the full ranked list. Exit code 0 even when issues are found (they are
the output); 1 only on errors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from build_engine.label_qa.issues import Issue


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perception lint-labels",
                                description="Find geometric and model-assisted label mistakes.")
    p.add_argument("--data", required=True,
                   help="dataset directory (COCO annotations.json or YOLO labels/ + classes.txt)")
    p.add_argument("--checkpoint",
                   help="a trained checkpoint for model-assisted checks (e.g. models/default/detector.pt)")
    p.add_argument("--json", action="store_true", help="print the ranked issues as JSON instead of a table")
    p.add_argument("--json-out", metavar="FILE", help="also write the ranked issues as JSON to FILE")
    p.add_argument("--limit", type=int, default=50, help="rows in the printed table (default 50)")
    p.add_argument("--min-score", type=float, default=0.0, help="drop issues scored below this")
    return p


def run(data: str, checkpoint: str | None = None, min_score: float = 0.0) -> list[Issue]:
    from build_engine.label_qa.issues import find_geometric_issues, rank
    from build_engine.label_qa.records import read_label_set

    ls = read_label_set(data)
    issues = find_geometric_issues(ls)
    if checkpoint:
        from build_engine.evaluate import postprocess_for, torch_runner
        from build_engine.label_qa.model_assisted import find_model_issues
        from build_engine.pruned_checkpoint import load_any_checkpoint
        from perception.errors import ConfigError

        model, meta = load_any_checkpoint(checkpoint)
        if tuple(meta.classes) != tuple(ls.classes):
            raise ConfigError(f"{checkpoint}: model classes {list(meta.classes)} "
                              f"differ from the dataset's {list(ls.classes)}")
        # Read as the model's family outputs (an SSD or two-stage checkpoint is no YOLO head).
        issues += find_model_issues(ls, torch_runner(model), meta.input_size, postprocess_for(model).output_layout)
    return rank([i for i in issues if i.score >= min_score])


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from build_engine.label_qa.issues import format_table

    issues = run(args.data, args.checkpoint, args.min_score)
    rows = [i.to_dict() for i in issues]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1) if args.json else format_table(issues, args.limit))
    return 0
