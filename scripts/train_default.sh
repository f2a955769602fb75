#!/usr/bin/env bash
# Train the shipped default detector on generated road scenes (CPU), score it with the serving
# pre/post-processing on the val set (seed 2, which chose the checkpoint) and on a fresh test
# set (seed 3), and publish it into models/default/ (detector.pt, config.yaml, eval.json,
# eval.md, plots/).
#
#   scripts/train_default.sh [RUN_DIR]         (RESUME=1 continues an interrupted stage 1)
#
# Stage 1: configs/default.yaml from scratch (10 epochs, 512x288). Stage 2:
# configs/default_finetune.yaml continues from stage 1's best weights (6 epochs). Stage 3:
# configs/default_hires.yaml fine-tunes stage 2's best at 640x384 (5 epochs). About 75 minutes
# on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${1:-runs/default}
mkdir -p "$RUN"
extra=()
if [[ "${RESUME:-0}" == 1 ]]; then extra+=(--resume); fi
"$PY" -m perception.cli train --config configs/default.yaml --out "$RUN" "${extra[@]}" 2>&1 | tee "$RUN/train.log"
"$PY" -m perception.cli train --config configs/default_finetune.yaml --set "init_checkpoint=$RUN/best.pt" \
    --out "$RUN/finetune" 2>&1 | tee "$RUN/finetune.log"
"$PY" -m perception.cli train --config configs/default_hires.yaml --set "init_checkpoint=$RUN/finetune/best.pt" \
    --out "$RUN/finetune/hires" 2>&1 | tee "$RUN/hires.log"
FINAL="$RUN/finetune/hires"
VAL=$(eval echo "$("$PY" -c 'from build_engine.config import load_config; d = load_config("configs/default.yaml").data; print(f"{d.cache_dir}/val-s{d.val_seed}-n{d.val_images}-{d.image_width}x{d.image_height}")')")
TEST=$(dirname "$VAL")/test-s3-n300-640x360
[[ -f "$TEST/annotations.json" ]] || "$PY" -m perception.cli gen-data --out "$TEST" --images 300 --seed 3 --width 640 --height 360
"$PY" -m perception.cli eval --checkpoint "$FINAL/best.pt" --data "$VAL" --out "$FINAL/eval_val"
"$PY" -m perception.cli eval --checkpoint "$FINAL/best.pt" --data "$TEST" --out "$FINAL/eval"
"$PY" -m build_engine.train.export_default "$FINAL" models/default
