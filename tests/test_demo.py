"""The README's first command, end to end on a reduced build: build -> serve -> replay the
bundled drive -> clean shutdown, with no server process left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_script_runs_end_to_end_and_stops_the_server(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {
        **os.environ,
        "PY": sys.executable,
        "DEMO_OUT": str(out),
        # a smaller gate and no scaling table keep this test short; the pipeline is the same
        "DEMO_BUILD_ARGS": (
            "--no-scaling --no-report --val-images 24 --calib-images 8 --latency-runs 5 --continue-on-fail"
        ),
        "DEMO_REPLAY_ARGS": "--max-rate",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "server stopped cleanly (exit 0)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_sent"] == summary["frames_answered"] == 120
    assert summary["kpi"]["map50"] > 0.5, summary["kpi"]  # the trained default really detects
    lines = (out / "detections.jsonl").read_text().splitlines()
    assert len(lines) == 120
    leftover = subprocess.run(["pgrep", "-f", str(out / "engine")], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"server still running: {leftover.stdout}"
