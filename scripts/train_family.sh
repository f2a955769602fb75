#!/usr/bin/env bash
# Train one of the other detector families (configs/ssd.yaml, configs/rcnn.yaml) on the same
# generated road scenes and splits as the default, score the published weights on the val set
# (seed 2, which chose the checkpoint) and the held-out test set (seed 3), and publish them into
# models/FAMILY/ (detector.pt stored in FP16, config.yaml, eval.json, eval.md, plots/).
#
#   scripts/train_family.sh ssd|rcnn [RUN_DIR]     (RESUME=1 continues an interrupted run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FAMILY=${1:?usage: scripts/train_family.sh ssd|rcnn [RUN_DIR]}
CONFIG=configs/$FAMILY.yaml
[[ -f "$CONFIG" ]] || { echo "no such config: $CONFIG" >&2; exit 2; }
RUN=${2:-runs/$FAMILY}
mkdir -p "$RUN"
extra=()
if [[ "${RESUME:-0}" == 1 ]]; then extra+=(--resume); fi
"$PY" -m perception.cli train --config "$CONFIG" --out "$RUN" --no-progress "${extra[@]}" 2>&1 | tee "$RUN/train.log"
VAL=$(eval echo "$("$PY" -c 'import sys; from build_engine.config import load_config; d = load_config(sys.argv[1]).data; print(f"{d.cache_dir}/val-s{d.val_seed}-n{d.val_images}-{d.image_width}x{d.image_height}")' "$CONFIG")")
TEST=$(dirname "$VAL")/test-s3-n300-640x360
[[ -f "$TEST/annotations.json" ]] || "$PY" -m perception.cli gen-data --out "$TEST" --images 300 --seed 3 --width 640 --height 360
"$PY" -m build_engine.train.export_default "$RUN" "models/$FAMILY" --config "$CONFIG"
"$PY" -m perception.cli eval --checkpoint "models/$FAMILY/detector.pt" --data "$VAL" --out "$RUN/eval_val"
"$PY" -m perception.cli eval --checkpoint "models/$FAMILY/detector.pt" --data "$TEST" --out "$RUN/eval"
"$PY" -m build_engine.train.export_default "$RUN" "models/$FAMILY" --config "$CONFIG"
