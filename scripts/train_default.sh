#!/usr/bin/env bash
# Train the shipped default detector on generated road scenes (CPU), prune and fine-tune a copy,
# score both with the serving pre/post-processing on the val set (seed 2, which chose the
# checkpoint) and on a fresh test set (seed 3), and publish them into models/default/
# (detector.pt, detector_pruned.pt, config.yaml, eval.json, eval_pruned.json, eval.md, plots/,
# label_qa_measure.json).
#
#   scripts/train_default.sh [RUN_DIR]         (RESUME=1 continues an interrupted training run)
#
# Training: configs/default.yaml from scratch (22 epochs at 512x288). Pruning: PRUNE_RATIO of the
# channels of every prunable layer (kept counts rounded to the model's multiple of 16) and
# PRUNE_BLOCKS whole residual blocks, then fine-tuning on the whole train set (PRUNE_EPOCHS, then
# the passes of PRUNE_PASSES distilled from the unpruned model: 45 epochs in all by default).
# Far objects (FAR_EPOCHS > 0; off by default): both models then fine-tuned FAR_EPOCHS on
# generated images whose objects go out to FAR_PX pixels tall (the generator's default floor is
# 11-16 px by class), the pruned one distilled from the fine-tuned one, scored the same way plus
# on far test scenes, and published into models/far/ (docs/tracking.md has what 6 epochs at 6 px
# measured).
# See models/default/eval.md for the times measured here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${1:-runs/default}
PRUNE_RATIO=${PRUNE_RATIO:-0.2}
PRUNE_BLOCKS=${PRUNE_BLOCKS:-2}
PRUNE_EPOCHS=${PRUNE_EPOCHS:-10}
FAR_PX=${FAR_PX:-6}
FAR_EPOCHS=${FAR_EPOCHS:-0}
# The val sets that choose the checkpoints, named as the generator caches them; a bad FAR_PX
# fails here, before hours of training.
val_dir() {
    "$PY" -c 'import sys
from build_engine.config import load_config
from build_engine.data.generate import dataset_dir
d = load_config("configs/default.yaml", sys.argv[1:]).data
print(dataset_dir(d.cache_dir, "val", d.val_images, d.val_seed, d.image_width, d.image_height, d.min_object_px))' "$@"
}
VAL=$(val_dir)
FAR_VAL=$(val_dir "data.min_object_px=$FAR_PX")
mkdir -p "$RUN"
extra=()
if [[ "${RESUME:-0}" == 1 ]]; then extra+=(--resume); fi
"$PY" -m perception.cli train --config configs/default.yaml --out "$RUN" "${extra[@]}" 2>&1 | tee "$RUN/train.log"
# Pruning with a first fine-tune (lr 0.01), then further fine-tuning passes distilled from the
# unpruned model, each a fresh cosine schedule: "lr:epochs" in PRUNE_PASSES.
PRUNE_PASSES=${PRUNE_PASSES:-"0.005:$PRUNE_EPOCHS 0.003:$PRUNE_EPOCHS 0.003:15"}
"$PY" -m perception.cli prune --checkpoint "$RUN/best.pt" --ratio "$PRUNE_RATIO" --remove-blocks "$PRUNE_BLOCKS" \
    --finetune-epochs "$PRUNE_EPOCHS" --lr 0.01 --out "$RUN/pruned_stage1.pt" 2>&1 | tee "$RUN/prune.log"
stage=1
for pass in $PRUNE_PASSES; do
    "$PY" -m perception.cli prune --checkpoint "$RUN/pruned_stage$stage.pt" --teacher "$RUN/best.pt" --ratio 0 --remove-blocks 0 \
        --finetune-epochs "${pass#*:}" --lr "${pass%%:*}" --out "$RUN/pruned_stage$((stage + 1)).pt" 2>&1 | tee "$RUN/prune$((stage + 1)).log"
    stage=$((stage + 1))
done
cp "$RUN/pruned_stage$stage.pt" "$RUN/pruned.pt"
TEST=$(dirname "$VAL")/test-s3-n300-640x360
[[ -f "$TEST/annotations.json" ]] || "$PY" -m perception.cli gen-data --out "$TEST" --images 300 --seed 3 --width 640 --height 360
# publish RUN_DIR MODEL_DIR CHOSE_ON [FAR_TEST]: publish the weights (stored in FP16), score the
# published files (on CHOSE_ON, the val set that chose the checkpoint, on the test set, and on
# FAR_TEST when given), then publish again with the reports (eval.json, eval_pruned.json,
# eval.md and plots come from the run's eval directories).
publish() {
    "$PY" -m build_engine.train.export_default "$1" "$2"
    if [[ -n "${4:-}" ]]; then
        "$PY" -m perception.cli eval --checkpoint "$2/detector.pt" --data "$4" --out "$1/eval_far"
    fi
    "$PY" -m perception.cli eval --checkpoint "$2/detector.pt" --data "$3" --out "$1/eval_val"
    "$PY" -m perception.cli eval --checkpoint "$2/detector.pt" --data "$TEST" --out "$1/eval"
    "$PY" -m perception.cli eval --checkpoint "$2/detector_pruned.pt" --data "$TEST" --out "$1/eval_pruned"
    "$PY" -m build_engine.train.export_default "$1" "$2"
}
publish "$RUN" models/default "$VAL"
# Label QA measured with the published model: 8 injected mistakes of each of 8 kinds in a copy
# of the val set; recall and flag precision land in models/default/label_qa_measure.json.
"$PY" -m build_engine.label_qa.measure --data "$VAL" --checkpoint models/default/detector.pt --out "$RUN/label_qa" --per-kind 8 >/dev/null
cp "$RUN/label_qa/label_qa_measure.json" models/default/
if (( FAR_EPOCHS > 0 )); then
    FAR=$RUN/far
    mkdir -p "$FAR"
    "$PY" -m perception.cli train --config configs/default.yaml --out "$FAR" --set init_checkpoint="$RUN/best.pt" \
        --set data.min_object_px="$FAR_PX" --set optim.epochs="$FAR_EPOCHS" --set optim.lr=0.005 \
        --set optim.warmup_epochs=0 2>&1 | tee "$FAR/train.log"
    "$PY" -m perception.cli prune --checkpoint "$RUN/pruned.pt" --teacher "$FAR/best.pt" --ratio 0 \
        --remove-blocks 0 --finetune-epochs "$FAR_EPOCHS" --lr 0.003 --set data.min_object_px="$FAR_PX" \
        --out "$FAR/pruned.pt" 2>&1 | tee "$FAR/prune.log"
    FAR_TEST=$TEST-far${FAR_PX}l2  # labelled down to 2 px (scene.FAR_MIN_LABEL_PX)
    [[ -f "$FAR_TEST/annotations.json" ]] || "$PY" -m perception.cli gen-data --out "$FAR_TEST" --images 300 --seed 3 \
        --width 640 --height 360 --min-object-px "$FAR_PX"
    mkdir -p models/far
    publish "$FAR" models/far "$FAR_VAL" "$FAR_TEST"
fi
