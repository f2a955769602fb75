#!/usr/bin/env bash
# The README's first command (`make demo`): build the shipped default model's engines, serve
# them, replay the bundled recorded drive over gRPC, print the summary, shut down cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${DEMO_OUT:-artifacts/demo}
DRIVE=${DEMO_DRIVE:-assets/drives/demo/drive.mcap}
GT=${DEMO_GT:-assets/drives/demo/gt.json}
mkdir -p "$OUT"
perception() { "$PY" -m perception.cli "$@"; }

# The shipped pruned model is built and gated beside the default one; DEMO_PRUNED= (empty) leaves it out.
PRUNED=${DEMO_PRUNED-models/default/detector_pruned.pt}
echo "== 1/3 build: fold BN, export ONNX, quantize, gate${PRUNED:+ (with the pruned $PRUNED)} -> $OUT/engine"
perception build --out "$OUT/engine" ${PRUNED:+--pruned "$PRUNED"} ${DEMO_BUILD_ARGS:-}

echo "== 2/3 serve: $OUT/engine/manifest.json"
LOG="$OUT/server.log"
# Started directly (not through the shell function) so that $! is the server itself and
# SIGTERM reaches it.
"$PY" -m perception.cli serve --model "$OUT/engine/manifest.json" --host 127.0.0.1 --port 0 --metrics-port 0 2>"$LOG" &
SERVER_PID=$!
cleanup() {
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
READY=""
for _ in $(seq 1 240); do
  READY=$(grep -o 'ready grpc=[^ ]* metrics=[^ ]*' "$LOG" | head -n1 || true)
  [ -n "$READY" ] && break
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "server exited before it was ready:"; cat "$LOG"; exit 1
  fi
  sleep 0.5
done
[ -n "$READY" ] || { echo "server not ready after 120 s:"; cat "$LOG"; exit 1; }
GRPC=${READY#ready grpc=}; GRPC=${GRPC%% *}
METRICS=${READY##*metrics=}
echo "   server ready: gRPC $GRPC, metrics http://$METRICS/metrics"

echo "== 3/3 replay: $DRIVE (recorded timing) against $GRPC"
perception replay "$DRIVE" --server "$GRPC" --out "$OUT/detections.jsonl" \
  --json-out "$OUT/summary.json" --gt "$GT" ${DEMO_REPLAY_ARGS:-}

echo "== server metrics (excerpt)"
"$PY" - "$METRICS" <<'PYEOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
for line in text.splitlines():
    if "_created" in line:
        continue
    if line.startswith(("perception_stage_latency_seconds_count", "perception_frames_", "perception_model_info")):
        print("  ", line)
PYEOF

kill -TERM "$SERVER_PID"
rc=0
wait "$SERVER_PID" || rc=$?
trap - EXIT
if [ "$rc" -ne 0 ]; then
  echo "server exited with status $rc after SIGTERM:"; tail -n 20 "$LOG"; exit 1
fi
echo "== server stopped cleanly (exit 0)"
echo "outputs: $OUT/detections.jsonl, $OUT/summary.json, $OUT/engine/report.md"
